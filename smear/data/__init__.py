"""Datasets: DomainNet (official layout) and its offline stand-in made from scikit-learn's digits."""
