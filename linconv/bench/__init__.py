"""Measurements. Each returns a result dataclass and prints nothing; linconv.report presents them."""

ROLES = ("original", "linearized")  # the models a side-by-side task compares, in report order
