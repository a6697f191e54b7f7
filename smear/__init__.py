"""smear: expert routing blocks and every routing method of the SMEAR paper (Muqeeth et al., TMLR 2024)."""
from smear.routing import available_methods, RoutingConfig

__all__ = ["available_methods", "RoutingConfig"]
