import type { JsonValue } from "../store/store.js";

/**
 * An amount of fleet resources: what runs under a tree node, in an environment, on an agent, or what
 * one VM takes. Byte figures are bigint (uint64 in the API).
 */
export interface Usage {
  vms: number;
  vcpus: number;
  memoryBytes: bigint;
  blockBytes: bigint;
  gpus: number;
  gpuMemoryBytes: bigint;
}

export const ZERO_USAGE: Readonly<Usage> = Object.freeze({
  vms: 0,
  vcpus: 0,
  memoryBytes: 0n,
  blockBytes: 0n,
  gpus: 0,
  gpuMemoryBytes: 0n,
});

export function addUsage(a: Usage, b: Usage): Usage {
  return {
    vms: a.vms + b.vms,
    vcpus: a.vcpus + b.vcpus,
    memoryBytes: a.memoryBytes + b.memoryBytes,
    blockBytes: a.blockBytes + b.blockBytes,
    gpus: a.gpus + b.gpus,
    gpuMemoryBytes: a.gpuMemoryBytes + b.gpuMemoryBytes,
  };
}

/** a − b, never below zero (a release of more than was charged leaves zero, not a negative figure). */
export function subUsage(a: Usage, b: Usage): Usage {
  const n = (x: number, y: number) => Math.max(0, x - y);
  const big = (x: bigint, y: bigint) => (x > y ? x - y : 0n);
  return {
    vms: n(a.vms, b.vms),
    vcpus: n(a.vcpus, b.vcpus),
    memoryBytes: big(a.memoryBytes, b.memoryBytes),
    blockBytes: big(a.blockBytes, b.blockBytes),
    gpus: n(a.gpus, b.gpus),
    gpuMemoryBytes: big(a.gpuMemoryBytes, b.gpuMemoryBytes),
  };
}

export function isZeroUsage(u: Usage): boolean {
  return (
    u.vms === 0 &&
    u.vcpus === 0 &&
    u.memoryBytes === 0n &&
    u.blockBytes === 0n &&
    u.gpus === 0 &&
    u.gpuMemoryBytes === 0n
  );
}

/** Usage as the store keeps it (uint64 as decimal strings). */
export type StoredUsage = {
  vms: number;
  vcpus: number;
  memoryBytes: string;
  blockBytes: string;
  gpus: number;
  gpuMemoryBytes: string;
};

export function usageToStore(u: Usage): StoredUsage & { [k: string]: JsonValue } {
  return {
    vms: u.vms,
    vcpus: u.vcpus,
    memoryBytes: u.memoryBytes.toString(),
    blockBytes: u.blockBytes.toString(),
    gpus: u.gpus,
    gpuMemoryBytes: u.gpuMemoryBytes.toString(),
  };
}

export function usageFromStore(s: StoredUsage | undefined): Usage {
  if (!s) return { ...ZERO_USAGE };
  return {
    vms: s.vms,
    vcpus: s.vcpus,
    memoryBytes: BigInt(s.memoryBytes),
    blockBytes: BigInt(s.blockBytes),
    gpus: s.gpus,
    gpuMemoryBytes: BigInt(s.gpuMemoryBytes),
  };
}
