"""Networks whose weights the user supplies (nothing here ships or downloads weights).

- `i3d.InceptionI3d`: Inception-I3D (Kinetics-400), state-dict names of the piergiaj/pytorch-i3d port
  (`i3d_pretrained_400.pt`), used for FVD.
- `syncnet.SyncNet`: the SyncNet "S" model of joonson/syncnet_python (`syncnet_v2.model`), used for LSE-D/C.
"""

from singer.evaluate.networks.i3d import InceptionI3d
from singer.evaluate.networks.syncnet import SyncNet

__all__ = ["InceptionI3d", "SyncNet"]
