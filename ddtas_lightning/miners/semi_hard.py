"""Semi-hard triplet mining (Schroff et al., FaceNet, CVPR 2015; NSPA's policy "SH", spec nspa.md §1.1).
``select="all"`` = PML ``TripletMarginMiner(type_of_triplets="semihard")``."""

from __future__ import annotations

from torch import Tensor

from ddtas_lightning.miners.base import TripletMiner


class SemiHardMiner(TripletMiner):
    """Per anchor-positive pair (a, p) (all ordered pairs), the negatives farther than the positive but
    inside the margin: ``d(a,p) < d(a,n) < d(a,p) + margin``.

    ``select="all"`` (default): every semi-hard triplet (PML's ``"semihard"`` type, which also accepts
    ``d(a,n) - d(a,p) == margin``). ``select="random"``: one uniformly at random per (a, p) (NSPA's
    rule; not the TF/FaceNet "closest semi-hard negative with fallback" variant).
    """

    def __init__(self, margin: float = 0.2, distance: str = "euclidean", select: str = "all") -> None:
        super().__init__(margin=margin, distance=distance, select=select)

    def candidates(self, delta: Tensor, neg_rows: Tensor) -> Tensor:
        return neg_rows & (delta > 0) & (delta < self.margin)
