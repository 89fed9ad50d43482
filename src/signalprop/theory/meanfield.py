"""Mean-field signal propagation in deep random networks, named after the papers' quantities.

Network: h^l = W^l phi(h^{l-1}) + b^l with W_ij ~ N(0, sigma_w^2 / fan_in), b_i ~ N(0, sigma_b^2),
in the limit of infinite width (Poole et al. 2016, "Exponential expressivity in deep neural
networks through transient chaos"; Schoenholz et al. 2017, "Deep Information Propagation").
z, z1, z2 ~ N(0, 1) independent throughout.

- length map (Poole eq. 3): q^l = sigma_w^2 E[phi(sqrt(q^{l-1}) z)^2] + sigma_b^2, fixed point q*.
- correlation map (Poole eq. 5): with u1 = sqrt(q*) z1, u2 = sqrt(q*) (c z1 + sqrt(1-c^2) z2),
  c^l = (sigma_w^2 E[phi(u1) phi(u2)] + sigma_b^2) / q*, fixed point c*.
- chi_1 = sigma_w^2 E[phi'(sqrt(q*) z)^2] (Poole eq. 7): the slope of the c-map at c = 1 and the
  per-layer growth factor of the *squared* back-propagated gradient (Schoenholz eq. 10):
  E[(dL/dh^l)^2] = chi_1 E[(dL/dh^{l+1})^2]. Edge of chaos: chi_1 = 1.
- chi_c = sigma_w^2 E[phi'(u1) phi'(u2)] at c = c* (Schoenholz eq. 6; chi_c = chi_1 when c* = 1).
- depth scales (Schoenholz eqs. 4, 6, 11): xi_q = -1/ln|dq-map/dq at q*|, xi_c = -1/ln chi_c,
  xi_grad = -1/ln chi_1 (positive: gradients vanish as exp(-l/xi); negative: they explode as
  exp(l/|xi|); infinite on the edge of chaos).

Everything here is NumPy/SciPy; the PyTorch bridge is :mod:`signalprop.theory.torch_adapter`.

The maps live in :mod:`signalprop.theory.maps`, the edge of chaos in
:mod:`signalprop.theory.critical`; this module is their one name (re-exported).
"""

from signalprop.theory import critical, maps
from signalprop.theory.critical import *  # noqa: F403
from signalprop.theory.maps import *  # noqa: F403

__all__: list[str] = []
__all__ += critical.__all__
__all__ += maps.__all__
