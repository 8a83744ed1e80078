import type { DiskCounters, VmmCounters } from "../driver.js";

/** One entry of QMP `query-cpus-fast`. */
export interface QmpCpu {
  "cpu-index": number;
  "thread-id": number;
}

/** One entry of QMP `query-blockstats` (the fields vmenv reads). */
export interface QmpBlockStats {
  device?: string;
  "node-name"?: string;
  qdev?: string;
  stats: Partial<
    Record<
      | "rd_bytes"
      | "wr_bytes"
      | "rd_operations"
      | "wr_operations"
      | "flush_operations"
      | "rd_total_time_ns"
      | "wr_total_time_ns",
      number
    >
  >;
}

/** QMP `query-balloon`'s answer. */
export interface QmpBalloon {
  actual: number;
}

/**
 * The device id of a disk in `query-blockstats`: vmenv names the virtio-blk device `disk-<id>` (its qdev
 * path is `/machine/peripheral/disk-<id>/virtio-backend`) and the format node `d-<id>`.
 */
export function diskIdOf(b: QmpBlockStats): string | undefined {
  const q = /^\/machine\/peripheral\/disk-([^/]+)(?:\/|$)/.exec(b.qdev ?? "");
  if (q?.[1]) return q[1];
  const n = /^d-(.+)$/.exec(b["node-name"] ?? "");
  return n?.[1];
}

/** The answers of `query-cpus-fast`, `query-blockstats` and (when there is a balloon) `query-balloon`. */
export function qemuCounters(
  cpus: QmpCpu[],
  blocks: QmpBlockStats[],
  balloon: QmpBalloon | undefined,
): VmmCounters {
  const disks: Record<string, DiskCounters> = {};
  for (const b of blocks) {
    const id = diskIdOf(b);
    if (id === undefined) continue;
    const s = b.stats;
    disks[id] = {
      readBytes: s.rd_bytes ?? 0,
      writeBytes: s.wr_bytes ?? 0,
      readOps: s.rd_operations ?? 0,
      writeOps: s.wr_operations ?? 0,
      flushOps: s.flush_operations ?? 0,
      readTimeNs: s.rd_total_time_ns ?? 0,
      writeTimeNs: s.wr_total_time_ns ?? 0,
    };
  }
  return {
    vcpuThreads: cpus
      .map((c) => ({ index: c["cpu-index"], threadId: c["thread-id"] }))
      .sort((a, b) => a.index - b.index),
    balloon: balloon ? { actualBytes: balloon.actual } : undefined,
    disks,
  };
}
