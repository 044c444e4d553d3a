"""The paper's numbers (../shared/PAPER.md), as data: the reference column of every table."""

# Table 1, CIFAR10: IS (mean, std), FID vs the train set, NLL test (train) in bits/dim (upper bounds).
TABLE1 = {
    "eps_vlb": {"label": "L, fixed isotropic Sigma", "is": (7.67, 0.13), "fid": 13.51, "nll_test": 3.70,
                "nll_train": 3.69},
    "eps_simple": {"label": "L_simple", "is": (9.46, 0.11), "fid": 3.17, "nll_test": 3.75, "nll_train": 3.72},
}

# Table 2: (IS mean, IS std, FID) or None where the paper reports the training as unstable.
TABLE2_ROWS = (("learned", "L, learned diagonal Sigma"), ("fixed", "L, fixed isotropic Sigma"),
               ("mse", "||mu-tilde - mu_theta||^2 / ||eps - eps_theta||^2"))
TABLE2_RUNS = {  # (row, column) -> run name in experiments.registry
    ("learned", "mu"): "mu_vlb_learned", ("fixed", "mu"): "mu_vlb", ("mse", "mu"): "mu_simple",
    ("learned", "eps"): "eps_vlb_learned", ("fixed", "eps"): "eps_vlb", ("mse", "eps"): "eps_simple",
}
TABLE2 = {
    "mu_vlb_learned": (7.28, 0.10, 23.69), "mu_vlb": (8.06, 0.09, 13.22), "mu_simple": None,
    "eps_vlb_learned": None, "eps_vlb": (7.67, 0.13, 13.51), "eps_simple": (9.46, 0.11, 3.17),
}

# Table 4 (CIFAR10 test, L_simple model): reverse step -> (cumulative rate bits/dim, distortion RMSE [0, 255]).
TABLE4 = {
    1000: (1.77581, 0.95136), 900: (0.11994, 12.02277), 800: (0.05415, 18.47482), 700: (0.02866, 24.43656),
    600: (0.01507, 30.80948), 500: (0.00716, 38.03236), 400: (0.00282, 46.12765), 300: (0.00081, 54.18826),
    200: (0.00013, 60.97170), 100: (0.00000, 67.60125),
}

# Beyond the paper: DDIM (Song, Meng & Ermon 2021) Table 1, CIFAR10, FID of 50k samples of the
# DDPM L_simple model against the number of sampling steps S (transcribed from that table):
# eta = 0 is DDIM; eta = 1 is DDPM with sigma^2 = beta-tilde on the subsequence (our respaced
# sampler with beta_tilde); sigma-hat is DDPM with sigma^2 = beta (our respaced sampler with
# beta, the paper's CIFAR10 variance; at S = 1000 it is the DDPM paper's 3.17).
DDIM_TABLE1_STEPS = (10, 20, 50, 100, 1000)
DDIM_TABLE1 = {
    "ddim (eta 0)": (13.36, 6.84, 4.67, 4.16, 4.04),
    "eta 1": (41.07, 18.36, 8.01, 5.78, 4.73),
    "sigma-hat": (367.43, 133.37, 32.72, 9.99, 3.17),
}
# which of those rows matches our samplers: ddim -> eta 0; respaced / ancestral -> by variance
DDIM_ROW_FOR = {"ddim": "ddim (eta 0)", "beta_tilde": "eta 1", "beta": "sigma-hat"}
