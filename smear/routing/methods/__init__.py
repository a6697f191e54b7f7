"""One file per routing method; the file name is its registry key (``smear.routing`` imports them all)."""
