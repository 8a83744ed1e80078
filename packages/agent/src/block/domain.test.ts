import { describe, expect, it } from "vitest";
import {
  checkAbsolutePath,
  checkFits,
  checkId,
  checkSize,
  clonesOf,
  sameVolumeSpec,
  snapshotFromName,
  sourceFromName,
  type VolumeRecord,
  volumeIdFromName,
} from "./domain.js";

const vol = (id: string, backing = ""): VolumeRecord => ({
  id,
  store: "default",
  format: "qcow2",
  sizeBytes: 1024n,
  backend: "file",
  labels: {},
  state: "ready",
  stateMessage: "",
  path: `/s/${id}.qcow2`,
  source: backing,
  backing,
  backingFile: "",
  bases: [],
  snapshots: [],
  pending: undefined,
  createTimeMs: 0,
  updateTimeMs: 0,
});

describe("block domain", () => {
  it("accepts AIP-122 ids and refuses paths and shell characters, naming the field", () => {
    expect(() => checkId("volume", "data-1", "volume_id")).not.toThrow();
    for (const bad of ["../x", "a/b", "a;b", "$(id)", "A", "1a", "a-", "", "a".repeat(64), "a b", "a.b"]) {
      expect(() => checkId("volume", bad, "volume_id"), bad).toThrow(
        expect.objectContaining({ code: "invalid-argument", reason: "INVALID_VOLUME_ID" }),
      );
    }
    expect(volumeIdFromName("volumes/x")).toBe("x");
    expect(() => volumeIdFromName("volumes/../../etc")).toThrow(/not a valid volume id/);
    expect(() => volumeIdFromName("vms/x")).toThrow(/not a volume name/);
    expect(snapshotFromName("volumes/v/snapshots/s")).toEqual(["v", "s"]);
    expect(sourceFromName("volumes/v", "source")).toEqual({ volume: "v", snapshot: undefined });
    expect(sourceFromName("volumes/v/snapshots/s", "source")).toEqual({ volume: "v", snapshot: "s" });
  });

  it("normalises absolute paths and refuses relative ones and ..", () => {
    expect(checkAbsolutePath("/srv//vm/./x/", "p")).toBe("/srv/vm/x");
    expect(() => checkAbsolutePath("srv/x", "p")).toThrow(/absolute/);
    expect(() => checkAbsolutePath("/srv/../etc", "p")).toThrow(/\.\./);
    expect(() => checkAbsolutePath("/srv/a\nb", "p")).toThrow(/newline/);
  });

  it("wants sizes above 0, in sectors, and a volume that fits in the free space", () => {
    expect(() => checkSize(0n, "size_bytes")).toThrow(/more than 0/);
    expect(() => checkSize(1000n, "size_bytes")).toThrow(/multiple of 512/);
    expect(() => checkSize(1n << 64n, "size_bytes")).toThrow(/larger than any volume/);
    expect(() => checkSize(4096n, "size_bytes")).not.toThrow();
    expect(() => checkFits("fast", 100n, 100n, 1000n)).not.toThrow();
    expect(() => checkFits("fast", 101n, 100n, 1000n)).toThrow(
      expect.objectContaining({
        code: "resource-exhausted",
        reason: "STORE_CAPACITY_EXCEEDED",
        metadata: { store: "stores/fast", requested_bytes: "101", free_bytes: "100", capacity_bytes: "1000" },
      }),
    );
  });

  it("compares specs regardless of label order, and finds linked clones", () => {
    const a = {
      store: "s",
      format: "qcow2" as const,
      sizeBytes: 1n,
      backend: "file" as const,
      labels: { a: "1", b: "2" },
      preallocate: false,
    };
    expect(sameVolumeSpec(a, { ...a, labels: { b: "2", a: "1" } })).toBe(true);
    expect(sameVolumeSpec(a, { ...a, sizeBytes: 2n })).toBe(false);
    const all = [
      vol("src"),
      vol("c2", "volumes/src"),
      vol("c1", "volumes/src/snapshots/s1"),
      vol("x", "volumes/srcx"),
    ];
    expect(clonesOf("src", all)).toEqual(["volumes/c1", "volumes/c2"]);
    expect(clonesOf("src", all, "s1")).toEqual(["volumes/c1"]);
    expect(clonesOf("x", all)).toEqual([]);
  });
});
