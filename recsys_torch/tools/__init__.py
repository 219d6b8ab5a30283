"""The workshop: benchmarks against peer libraries, sweep plumbing, reports and plots, fold-in
evaluation. Built on the core and the experiment entry (:mod:`recsys_torch.train`); the core never
imports anything from here. Hydra, OmegaConf, Optuna, matplotlib and the peer libraries may be
imported in this package."""
