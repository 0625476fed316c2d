"""``sparsify``: the plan → insert → calibrate → fold phases that attach a config or a recipe."""
