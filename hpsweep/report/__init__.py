"""What a sweep shows its users, over ``hpsweep.model.TrialRow`` and ``hpsweep.store``: ranking and the
report files (``leaderboard``), their figures (``plots``), the report assembled from the store
(``assemble``) and `hpsweep status` (``status``). Nothing here imports ``flows``.
"""
