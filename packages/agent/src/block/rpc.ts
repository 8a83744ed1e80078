import { anyPack } from "@bufbuild/protobuf/wkt";
import { BlockService, StoreSchema, VolumeSchema, VolumeSnapshotSchema } from "@vmenv/api/agent/v1";
import { bind, invalidArgument, type ServiceBinding } from "@vmenv/rpc";
import { toPbOperation } from "../diagnostics/convert.js";
import { noFilter, page } from "../paging.js";
import { fromPbBackend, fromPbFormat, toPbStore, toPbVolume, toPbVolumeSnapshot } from "./convert.js";
import { checkId, snapshotFromName, sourceFromName, storeIdFromName, volumeIdFromName } from "./domain.js";
import type { BlockManager, StoreView, VolumeSnapshotView, VolumeView } from "./manager.js";

/**
 * Packs a block operation's result for the API: a volume becomes a Volume, a volume snapshot a
 * VolumeSnapshot, a store a Store; anything else undefined (so the agent can chain it with the VM one).
 */
export function packResult(r: unknown) {
  if (r === null || typeof r !== "object" || !("kind" in r)) return undefined;
  switch (r.kind) {
    case "volume":
      return anyPack(VolumeSchema, toPbVolume(r as VolumeView));
    case "volume-snapshot":
      return anyPack(VolumeSnapshotSchema, toPbVolumeSnapshot(r as VolumeSnapshotView));
    case "store":
      return anyPack(StoreSchema, toPbStore(r as StoreView));
    default:
      return undefined;
  }
}

/** BlockService: check, convert, call the manager, convert back. */
export function blockService(m: BlockManager): ServiceBinding {
  const op = (o: Parameters<typeof toPbOperation>[0]) => toPbOperation(o, packResult);
  const store = (name: string, field: string) => (name ? storeIdFromName(name, field) : undefined);

  return bind(BlockService, {
    async createStore(req) {
      checkId("store", req.storeId, "store_id");
      if (!req.store) throw invalidArgument("store", "is required");
      return toPbStore(
        await m.createStore(req.storeId, {
          path: req.store.path,
          shared: req.store.shared,
          labels: { ...req.store.labels },
        }),
      );
    },
    async getStore(req) {
      return toPbStore(await m.getStore(storeIdFromName(req.name)));
    },
    async listStores(req) {
      noFilter(req.filter);
      const p = page(await m.listStores(), (s) => s.record.id, req.pageSize, req.pageToken);
      return { stores: p.items.map(toPbStore), nextPageToken: p.next };
    },
    async deleteStore(req) {
      await m.deleteStore(storeIdFromName(req.name), { allowMissing: req.allowMissing });
      return {};
    },
    async createVolume(req) {
      checkId("volume", req.volumeId, "volume_id");
      const v = req.volume;
      if (!v) throw invalidArgument("volume", "is required");
      return op(
        await m.create(
          req.volumeId,
          {
            store: store(v.store, "volume.store") ?? "default",
            format: fromPbFormat(v.format, "volume.format") ?? "qcow2",
            sizeBytes: v.sizeBytes,
            backend: fromPbBackend(v.backend, "volume.backend"),
            labels: { ...v.labels },
            preallocate: req.preallocate,
          },
          { requestId: req.requestId },
        ),
      );
    },
    async getVolume(req) {
      return toPbVolume(await m.getVolume(volumeIdFromName(req.name)));
    },
    async listVolumes(req) {
      noFilter(req.filter);
      const usedBy = req.usedBy;
      if (usedBy && !/^vms\/[a-z][a-z0-9-]{0,62}$/.test(usedBy))
        throw invalidArgument("used_by", `"${usedBy.slice(0, 80)}" is not a VM name (vms/{vm})`);
      const storeId = store(req.store, "store");
      const all = await m.listVolumes({
        ...(storeId ? { store: storeId } : {}),
        ...(usedBy ? { usedBy } : {}),
        labels: { ...req.labels },
      });
      const p = page(all, (v) => v.record.id, req.pageSize, req.pageToken);
      return { volumes: p.items.map(toPbVolume), nextPageToken: p.next };
    },
    async deleteVolume(req) {
      return op(
        await m.delete(volumeIdFromName(req.name), {
          force: req.force,
          allowMissing: req.allowMissing,
          requestId: req.requestId,
        }),
      );
    },
    async importVolume(req) {
      checkId("volume", req.volumeId, "volume_id");
      const v = req.volume;
      if (!v) throw invalidArgument("volume", "is required");
      return op(
        await m.import(
          req.volumeId,
          {
            store: store(v.store, "volume.store") ?? "default",
            format: fromPbFormat(v.format, "volume.format"),
            sizeBytes: v.sizeBytes,
            backend: fromPbBackend(v.backend, "volume.backend"),
            labels: { ...v.labels },
          },
          {
            uri: req.sourceUri,
            format: fromPbFormat(req.sourceFormat, "source_format"),
            sha256: req.sourceSha256,
          },
          { requestId: req.requestId },
        ),
      );
    },
    async cloneVolume(req) {
      const source = sourceFromName(req.source, "source");
      checkId("volume", req.volumeId, "volume_id");
      const v = req.volume;
      return op(
        await m.clone(
          source,
          req.volumeId,
          {
            store: v ? store(v.store, "volume.store") : undefined,
            sizeBytes: v?.sizeBytes ?? 0n,
            backend: fromPbBackend(v?.backend ?? 0, "volume.backend"),
            labels: { ...v?.labels },
            linked: req.linked,
          },
          { requestId: req.requestId },
        ),
      );
    },
    async snapshotVolume(req) {
      const id = volumeIdFromName(req.name);
      checkId("snapshot", req.snapshotId, "snapshot_id");
      return op(await m.snapshot(id, req.snapshotId, { ...req.labels }, { requestId: req.requestId }));
    },
    listVolumeSnapshots(req) {
      noFilter(req.filter);
      const id = req.parent === "volumes/-" ? undefined : volumeIdFromName(req.parent, "parent");
      const all = m.listSnapshots(id);
      const start = req.pageToken ? Number(Buffer.from(req.pageToken, "base64url").toString()) : 0;
      if (!Number.isInteger(start) || start < 0)
        throw invalidArgument("page_token", "is not a token this agent gave");
      const size = req.pageSize > 0 ? Math.min(req.pageSize, 1000) : 100;
      return {
        volumeSnapshots: all.slice(start, start + size).map(toPbVolumeSnapshot),
        nextPageToken:
          start + size < all.length ? Buffer.from(String(start + size)).toString("base64url") : "",
      };
    },
    async deleteVolumeSnapshot(req) {
      const [vol, sid] = snapshotFromName(req.name);
      await m.deleteSnapshot(vol, sid);
      return {};
    },
    async resizeVolume(req) {
      return op(await m.resize(volumeIdFromName(req.name), req.sizeBytes, { requestId: req.requestId }));
    },
  });
}
