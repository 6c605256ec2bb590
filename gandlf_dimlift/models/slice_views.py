"""Names the slice attention model and its explanation tools share, importable without torch (`explain` stays light)."""

KEY = "dimlift_slice_attention"
VIEWS = ("x", "y", "z")  # GaNDLF's (X, Y, Z) axes, in the order `slice_axis: all` stacks them
SLICE_AXES = (*VIEWS, "all")
