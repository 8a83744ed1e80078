import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import {
  type Store,
  StoreSchema,
  type Volume,
  VolumeBackend as VolumeBackendPb,
  VolumeFormat as VolumeFormatPb,
  VolumeSchema,
  type VolumeSnapshot,
  VolumeSnapshotSchema,
  VolumeState as VolumeStatePb,
} from "@vmenv/api/agent/v1";
import { invalidArgument } from "@vmenv/rpc/errors";
import type { VolumeBackendKind, VolumeFormat, VolumeState } from "./domain.js";
import type { StoreView, VolumeSnapshotView, VolumeView } from "./manager.js";

const formats: Record<VolumeFormat, VolumeFormatPb> = {
  raw: VolumeFormatPb.RAW,
  qcow2: VolumeFormatPb.QCOW2,
};
const backends: Record<VolumeBackendKind, VolumeBackendPb> = {
  file: VolumeBackendPb.FILE,
  "vhost-user-blk": VolumeBackendPb.VHOST_USER_BLK,
  nbd: VolumeBackendPb.NBD,
};
const states: Record<VolumeState, VolumeStatePb> = {
  creating: VolumeStatePb.CREATING,
  ready: VolumeStatePb.READY,
  updating: VolumeStatePb.UPDATING,
  deleting: VolumeStatePb.DELETING,
  failed: VolumeStatePb.FAILED,
};

/** The API's format → the domain's; UNSPECIFIED → undefined; an unknown number → INVALID_ARGUMENT. */
export function fromPbFormat(f: VolumeFormatPb, field: string): VolumeFormat | undefined {
  if (f === VolumeFormatPb.UNSPECIFIED) return undefined;
  const k = (Object.keys(formats) as VolumeFormat[]).find((x) => formats[x] === f);
  if (!k) throw invalidArgument(field, `${f} is not a volume format (RAW or QCOW2)`, "INVALID_VOLUME_FORMAT");
  return k;
}

export function fromPbBackend(b: VolumeBackendPb, field: string): VolumeBackendKind {
  if (b === VolumeBackendPb.UNSPECIFIED) return "file";
  const k = (Object.keys(backends) as VolumeBackendKind[]).find((x) => backends[x] === b);
  if (!k) throw invalidArgument(field, `${b} is not a volume backend`, "INVALID_VOLUME_BACKEND");
  return k;
}

export function toPbStore(v: StoreView): Store {
  const s = v.record;
  return create(StoreSchema, {
    name: `stores/${s.id}`,
    path: s.path,
    shared: s.shared,
    labels: s.labels,
    capacityBytes: v.capacityBytes,
    usedBytes: v.usedBytes,
    freeBytes: v.freeBytes,
    provisionedBytes: v.provisionedBytes,
    volumeCount: v.volumeCount,
    createTime: timestampFromMs(s.createTimeMs),
  });
}

export function toPbVolume(v: VolumeView): Volume {
  const r = v.record;
  return create(VolumeSchema, {
    name: `volumes/${r.id}`,
    store: `stores/${r.store}`,
    format: formats[r.format],
    sizeBytes: r.sizeBytes,
    backend: backends[r.backend],
    labels: r.labels,
    state: states[r.state],
    path: r.path,
    allocatedBytes: v.allocatedBytes,
    source: r.source,
    backing: r.backing,
    usedBy: v.usedBy,
    backendAddress: v.backendAddress,
    createTime: timestampFromMs(r.createTimeMs),
    updateTime: timestampFromMs(r.updateTimeMs),
  });
}

export function toPbVolumeSnapshot(v: VolumeSnapshotView): VolumeSnapshot {
  const s = v.snapshot;
  return create(VolumeSnapshotSchema, {
    name: `${v.volume}/snapshots/${s.id}`,
    sizeBytes: s.sizeBytes,
    allocatedBytes: 0n,
    vmSnapshot: "",
    clones: v.clones,
    labels: s.labels,
    createTime: timestampFromMs(s.createTimeMs),
  });
}
