"""Random-hard triplet mining: negatives that violate the margin (NSPA's policy "H", Kertész 2022;
spec nspa.md §1.1). ``select="all"`` = PML ``TripletMarginMiner(type_of_triplets="all")``."""

from __future__ import annotations

from torch import Tensor

from ddtas_lightning.miners.base import TripletMiner


class RandomHardMiner(TripletMiner):
    """Per anchor-positive pair (a, p) (all ordered pairs), the negatives n with
    ``d(a,p) - d(a,n) + margin > 0`` (every margin violator, semi-hard ones included).

    ``select="random"`` (default): one of them uniformly at random per (a, p), drawn with the
    ``generator`` passed to ``forward``; pairs without a violator yield no triplet.
    ``select="all"``: every violating triplet. Compared with PML's ``"all"`` type
    (``d(a,n) - d(a,p) <= margin``), the boundary ``d(a,n) - d(a,p) == margin`` (zero loss) is excluded.
    """

    def __init__(self, margin: float = 0.2, distance: str = "euclidean", select: str = "random") -> None:
        super().__init__(margin=margin, distance=distance, select=select)

    def candidates(self, delta: Tensor, neg_rows: Tensor) -> Tensor:
        return neg_rows & (delta < self.margin)
