"""Files shipped with the package: the AudioSet label list (index, mid, display_name)."""
