"""Communication helpers: the ring exchange and cross-rank consistency checks."""
from .consistency import check_same_on_all_ranks
from .ring_comm import RingComm
from .shutdown import shutdown

__all__ = ["RingComm", "check_same_on_all_ranks", "shutdown"]
