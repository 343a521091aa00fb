"""Slow, obviously correct NumPy references, written from each rule's published formula.

Each reference updates copies in float64 and returns the new parameter and state; nothing
here shares code with the kernels. ``t`` is the 1-based step number; ``state`` holds the
buffers under torch's names plus host scalars.
"""

from __future__ import annotations

import numpy as np


def _grad(p, g, hp):
    g = -g if hp.get("maximize") else g
    if hp.get("weight_decay") and not hp.get("decoupled_weight_decay"):
        g = g + hp["weight_decay"] * p
    return g


def _decoupled(p, hp):
    if hp.get("decoupled_weight_decay") and hp.get("weight_decay"):
        return p * (1 - hp["lr"] * hp["weight_decay"])
    return p


def sgd(p, g, s, t, hp):
    d = _grad(p, g, hp)
    mu = hp["momentum"]
    if mu == 0:
        return p - hp["lr"] * d, s
    if t == 1 and hp["momentum_init"] == "grad":
        b = d.copy()
    else:
        b = mu * s["momentum_buffer"] + (1 - hp["dampening"]) * d
    step = d + mu * b if hp["nesterov"] else b
    return p - hp["lr"] * step, {"momentum_buffer": b}


def adagrad(p, g, s, t, hp):
    g = _grad(p, g, hp)
    G = s["sum"] + g**2
    lr_t = hp["lr"] / (1 + (t - 1) * hp["lr_decay"])
    if hp["eps_inside_sqrt"]:
        return p - lr_t * g / np.sqrt(G + hp["eps"]), {"sum": G}
    return p - lr_t * g / (np.sqrt(G) + hp["eps"]), {"sum": G}


def adadelta(p, g, s, t, hp):
    g = _grad(p, g, hp)
    rho, eps = hp["rho"], hp["eps"]
    Eg2 = rho * s["square_avg"] + (1 - rho) * g**2
    delta = np.sqrt(s["acc_delta"] + eps) / np.sqrt(Eg2 + eps) * g
    Ed2 = rho * s["acc_delta"] + (1 - rho) * delta**2
    return p - hp["lr"] * delta, {"square_avg": Eg2, "acc_delta": Ed2}


def rmsprop(p, g, s, t, hp):
    g = _grad(p, g, hp)
    a, eps = hp["alpha"], hp["eps"]
    v = a * s["square_avg"] + (1 - a) * g**2
    out = {"square_avg": v}
    var = v
    if hp["centered"]:
        gbar = a * s["grad_avg"] + (1 - a) * g
        out["grad_avg"] = gbar
        var = v - gbar**2
    denom = np.sqrt(var + eps) if hp["eps_inside_sqrt"] else np.sqrt(var) + eps
    if hp["momentum"] > 0:
        b = hp["momentum"] * s["momentum_buffer"] + g / denom
        out["momentum_buffer"] = b
        return p - hp["lr"] * b, out
    return p - hp["lr"] * g / denom, out


def adam(p, g, s, t, hp):
    g = _grad(p, g, hp)
    p = _decoupled(p, hp)
    b1, b2 = hp["betas"]
    m = b1 * s["exp_avg"] + (1 - b1) * g
    v = b2 * s["exp_avg_sq"] + (1 - b2) * g**2
    out = {"exp_avg": m, "exp_avg_sq": v}
    vhat = v
    if hp["amsgrad"]:
        vhat = np.maximum(s["max_exp_avg_sq"], v)
        out["max_exp_avg_sq"] = vhat
    m_hat = m / (1 - b1**t)
    v_hat = vhat / (1 - b2**t)
    return p - hp["lr"] * m_hat / (np.sqrt(v_hat) + hp["eps"]), out


def adamax(p, g, s, t, hp):
    g = _grad(p, g, hp)
    b1, b2 = hp["betas"]
    m = b1 * s["exp_avg"] + (1 - b1) * g
    u = np.maximum(b2 * s["exp_inf"], np.abs(g) + hp["eps"])
    return p - hp["lr"] / (1 - b1**t) * m / u, {"exp_avg": m, "exp_inf": u}


def nadam(p, g, s, t, hp):
    g = _grad(p, g, hp)
    p = _decoupled(p, hp)
    b1, b2 = hp["betas"]
    psi = hp["momentum_decay"]
    mu_t = b1 * (1 - 0.5 * 0.96 ** (t * psi))
    mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * psi))
    prod = s["mu_product"] * mu_t
    m = b1 * s["exp_avg"] + (1 - b1) * g
    v = b2 * s["exp_avg_sq"] + (1 - b2) * g**2
    d = np.sqrt(v / (1 - b2**t)) + hp["eps"]
    p = p - hp["lr"] * (1 - mu_t) / (1 - prod) * g / d - hp["lr"] * mu_next / (1 - prod * mu_next) * m / d
    return p, {"exp_avg": m, "exp_avg_sq": v, "mu_product": prod}


def radam(p, g, s, t, hp):
    g = _grad(p, g, hp)
    p = _decoupled(p, hp)
    b1, b2 = hp["betas"]
    m = b1 * s["exp_avg"] + (1 - b1) * g
    v = b2 * s["exp_avg_sq"] + (1 - b2) * g**2
    m_hat = m / (1 - b1**t)
    rho_inf = 2 / (1 - b2) - 1
    rho_t = rho_inf - 2 * t * b2**t / (1 - b2**t)
    if rho_t > 5:
        r = np.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
        p = p - hp["lr"] * m_hat * r * np.sqrt(1 - b2**t) / (np.sqrt(v) + hp["eps"])
    else:
        p = p - hp["lr"] * m_hat
    return p, {"exp_avg": m, "exp_avg_sq": v}


REFERENCES = {"sgd": sgd, "adagrad": adagrad, "adadelta": adadelta, "rmsprop": rmsprop, "adam": adam,
              "adamax": adamax, "nadam": nadam, "radam": radam}


def initial_state(rule: str, shape, hp) -> dict:
    z = np.zeros(shape)
    return {
        "sgd": lambda: {"momentum_buffer": z.copy()} if hp["momentum"] else {},
        "adagrad": lambda: {"sum": np.full(shape, float(hp["initial_accumulator_value"]))},
        "adadelta": lambda: {"square_avg": z.copy(), "acc_delta": z.copy()},
        "rmsprop": lambda: {"square_avg": z.copy(),
                            **({"grad_avg": z.copy()} if hp["centered"] else {}),
                            **({"momentum_buffer": z.copy()} if hp["momentum"] > 0 else {})},
        "adam": lambda: {"exp_avg": z.copy(), "exp_avg_sq": z.copy(),
                         **({"max_exp_avg_sq": z.copy()} if hp["amsgrad"] else {})},
        "adamax": lambda: {"exp_avg": z.copy(), "exp_inf": z.copy()},
        "nadam": lambda: {"exp_avg": z.copy(), "exp_avg_sq": z.copy(), "mu_product": 1.0},
        "radam": lambda: {"exp_avg": z.copy(), "exp_avg_sq": z.copy()},
    }[rule]()
