"""Measurements. Each returns a result dataclass and prints nothing; linconv.report presents them."""
