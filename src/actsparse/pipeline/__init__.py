"""``sparsify``: the plan → insert → fit → fold phases that attach a config or a recipe."""
