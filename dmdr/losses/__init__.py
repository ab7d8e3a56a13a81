"""Losses: the DMD generator and critic losses (:mod:`dmdr.losses.dmd`) and the RL losses (:mod:`dmdr.losses.rl`)."""
