"""The decision vocabulary of the pool table (its `decision` column) and of training batches (their `code`).

It is part of the table contract, so it lives with the data: the algorithms decide which code a row gets
(`algorithms.loft.pseudo_label_decision`); the data layer only stores, reads and routes the codes.
"""

DECISIONS = ("hard", "soft", "ood", "rejected")  # table strings; a row's code is its index here
HARD, SOFT, OOD, REJECTED = 0, 1, 2, 3
LABELED = -1  # code of labeled rows inside a training batch
IGNORED = -2  # code of rows that failed to decode: they get no loss, and are counted
