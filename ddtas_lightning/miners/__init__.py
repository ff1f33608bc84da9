from ddtas_lightning.miners.asms import ASMS
from ddtas_lightning.miners.at_asms import AdaptiveToleranceASMS
from ddtas_lightning.miners.base import BaseMiner, PairMiner, TripletMiner
from ddtas_lightning.miners.batch_hard import BatchHardMiner
from ddtas_lightning.miners.ms import MultiSimilarityMiner
from ddtas_lightning.miners.none import AllPairsMiner
from ddtas_lightning.miners.nspa import NSPAMiner, nspa_probabilities, nspa_select
from ddtas_lightning.miners.random_hard import RandomHardMiner
from ddtas_lightning.miners.selection import PairSelection, basic_stats, label_masks
from ddtas_lightning.miners.semi_hard import SemiHardMiner

__all__ = [
    "ASMS",
    "AdaptiveToleranceASMS",
    "AllPairsMiner",
    "BaseMiner",
    "PairMiner",
    "BatchHardMiner",
    "MultiSimilarityMiner",
    "NSPAMiner",
    "PairSelection",
    "RandomHardMiner",
    "SemiHardMiner",
    "TripletMiner",
    "basic_stats",
    "label_masks",
    "nspa_probabilities",
    "nspa_select",
]
