"""`drop_upcycle`: upcycling with a fraction of each expert re-initialised (see `upcycle`)."""
from .upcycle import DropUpcycle

OPERATOR = DropUpcycle()
