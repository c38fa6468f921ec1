"""Reference models of a victim: same architecture, trained on random halves of a known pool.

Modules: recipe (ReferenceRecipe), pool (Pool, masks, seeds), store (folders, manifest, ReferenceSet),
train (train_references), logits (reference_logits), attacks (LiRA, RMIA, label-only likelihood ratios).

Reference-model attacks (LiRA, RMIA; see mia.references.attacks) compare the victim's behaviour on a
record with that of models known to have trained on it (IN) and models known not to have (OUT).
This module trains those models, keeps track of which record each one saw, and computes their
logits.

The pool is every record whose label is known: the victim's eval records, then its test records,
then (optionally) population records from a folder of ``.p`` files. Record ``i`` of the eval file is
pool index ``i``; record ``i`` of the test file is pool index ``n_eval + i``.

Masks: ``masks[j, i]`` is True when model ``j`` trains on pool record ``i``. As in LiRA (Carlini et
al. 2022), every record is IN for exactly ``k/2`` models, a uniformly random subset drawn per record,
so each record has ``k/2`` IN and ``k/2`` OUT models. The masks depend only on (seed, k, pool size).

Layout, under ``<bundle>/references/<victim.name>/``::

    manifest.json        recipe, pool (sizes, sha256 of every source file and of the victim
                         checkpoint), fingerprint, per-model accuracy, complete and missing models
    masks.npy            (k, N_pool) bool
    model_{j:03d}.pth    {'net', 'acc', 'epoch'} (mia.io.checkpoints.save_checkpoint; 'acc' = OUT accuracy %)
    model_{j:03d}.json   accuracy on its IN and OUT records, seconds, device, fingerprint

Their logits on the pool are cached outside the bundle (mia.io.cache, ``<cache root>/logits/``).

A model is complete when its ``.pth`` and its ``.json`` (written second, both atomically) exist and
the ``.json`` carries the folder's fingerprint. The folder, not the manifest, is the truth: every
call rebuilds ``manifest.json`` from the per-model files. Hence

* resume: a run stopped after 5 of 8 models keeps those 5; the next call trains the other 3;
* shards: ``shard=(i, n)`` trains only models ``j`` with ``j % n == i``, so n processes (a job array,
  several GPUs) can fill one folder, separately or at the same time; any later call merges;
* a call whose recipe or pool differs from the folder's (other epochs, other k, changed eval file,
  ...) raises MIAError instead of mixing models of different recipes.

Model ``j`` is seeded from (seed, j) alone, so on the CPU a model's weights do not depend on which
shard or which run trained it (bitwise, for one torch version and thread count: parallel float
reductions differ with the number of threads). On CUDA training runs in bf16 autocast (not bitwise reproducible).
"""
from mia.references.logits import reference_logits, views_from_names
from mia.references.pool import Pool, distill_masks, load_pool, make_masks
from mia.references.recipe import Distill, ReferenceRecipe
from mia.references.store import REFERENCES_FORMAT, ReferenceSet, default_arch_dirs, load_reference_set, references_folder
from mia.references.train import parse_shard, train_references

__all__ = [
    "REFERENCES_FORMAT",
    "Distill",
    "Pool",
    "ReferenceRecipe",
    "ReferenceSet",
    "default_arch_dirs",
    "distill_masks",
    "load_pool",
    "load_reference_set",
    "make_masks",
    "parse_shard",
    "reference_logits",
    "references_folder",
    "train_references",
    "views_from_names",
]
