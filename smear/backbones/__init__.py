"""Backbones with expert routing blocks injected: ResNet-18 (DomainNet) and T5 v1.1 (GLUE)."""
