"""What the fleet shares besides caps and rates, started together by the supervisor:
the suppression list (suppression_sync.py), suspensions and reactions (holds_sync.py)
and campaign counters (campaign_sync.py). All of it runs as asyncio tasks of the
supervisor on its own handle of the queue; no worker waits on Redis."""

from __future__ import annotations

from engine.cluster.campaign_sync import CampaignSync
from engine.cluster.holds_sync import HoldsSync
from engine.cluster.link import ClusterLink
from engine.cluster.suppression_sync import SuppressionSync
from engine.control.commands import ControlPlane
from engine.queue import supp_outbox
from engine.queue.store import QueueStore


class DataSync:
    def __init__(self, link: ClusterLink, store: QueueStore, plane: ControlPlane) -> None:
        self.suppression = SuppressionSync(link, store, plane._thread)
        self.holds = HoldsSync(link, plane)
        self.campaigns = CampaignSync(link, store, plane._thread)
        self.plane = plane

    async def start(self) -> None:
        await self.suppression.start()
        await self.holds.start()
        await self.campaigns.start()
        self.plane.lists.fleet_campaigns = self.campaigns.fleet_counts
        self.plane.lists.on_change = self.suppression.poke

    async def stop(self) -> None:
        self.plane.lists.fleet_campaigns = self.plane.lists.on_change = None
        await self.campaigns.stop()
        await self.holds.stop()
        await self.suppression.stop()


async def start_data_sync(link: ClusterLink, store: QueueStore, plane: ControlPlane) -> DataSync:
    """Start sharing the list, the holds and the counters through `link`."""
    sync = DataSync(link, store, plane)
    await sync.start()
    return sync


def leave_cluster(store: QueueStore) -> None:
    """A node started without `[cluster]`: stop recording local changes for a fleet
    (the mark off; call it in a thread). A later join publishes the whole list again."""
    if store.get_control(supp_outbox.ON_KEY) is not None:
        store.write_one(lambda w: supp_outbox.set_on(w, False))
