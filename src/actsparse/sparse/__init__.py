"""The sparse model: ``SparseLinear``, the layers it targets, density counting, and the handle that
attaches and removes them."""
