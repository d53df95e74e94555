"""The methods, one module each, and the registry they are found in by name.

| module | method (registered name) |
| --- | --- |
| `all_reduce` | all-reduce: the exact average |
| `dpsgd` | dpsgd: uncompressed gossip (D-PSGD) |
| `power_gossip` | power-gossip: PowerGossip with its per-edge state |
| `large_parameters` | the wrapper that gossips small tensors uncompressed (used by power-gossip) |
| `compressed` | what Choco and DeepSqueeze share (compressor, per-worker state) |
| `choco`, `deepsqueeze` | choco, deepsqueeze |
| `moniqua` | moniqua |
| `push_sum` | push-sum (Stochastic Gradient Push's gossip) |
| `powersgd` | powersgd: compressed all-reduce of gradients |
| `relay_sum` | relay-sum: RelaySum on trees |
| `corrected` | what D² and gradient tracking share (x^{t+1} = W(x^{t+1/2} + c^t)) |
| `d2`, `gradient_tracking` | d2 (exact diffusion), gradient-tracking |
| `ad_psgd` | ad-psgd: asynchronous pairwise averages on the simulated clock's events (AD-PSGD) |

`base` holds the interface (`Method`) and the batched helpers; `registry` the registry.
Importing this package registers every built-in method.
"""
# Each registers itself; in this order, the order the registry lists them in (error messages, docs).
from powergossip.methods import all_reduce  # noqa: F401, I001
from powergossip.methods import dpsgd  # noqa: F401
from powergossip.methods import power_gossip  # noqa: F401
from powergossip.methods import choco  # noqa: F401
from powergossip.methods import deepsqueeze  # noqa: F401
from powergossip.methods import moniqua  # noqa: F401
from powergossip.methods import powersgd  # noqa: F401
from powergossip.methods import push_sum  # noqa: F401
from powergossip.methods import relay_sum  # noqa: F401
from powergossip.methods import d2  # noqa: F401
from powergossip.methods import gradient_tracking  # noqa: F401
from powergossip.methods import ad_psgd  # noqa: F401
from powergossip.methods.base import GossipConfig, Method  # noqa: F401
from powergossip.methods.registry import METHODS, Registration, build, check, register_algorithm, registered_name  # noqa: F401
