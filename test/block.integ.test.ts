/**
 * The block service on the real `qemu-img`: the manager driven through its RPC binding over connect's
 * in-memory router transport (with the agent's error mapper), files checked with `qemu-img info`.
 */
import { execFile } from "node:child_process";
import { mkdtemp, readdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { anyUnpack } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import {
  BlockService,
  type Operation,
  OperationState,
  VolumeFormat,
  VolumeSchema,
  VolumeSnapshotSchema,
  VolumeState,
} from "@vmenv/api/agent/v1";
import { ErrorInfoSchema } from "@vmenv/api/google/rpc";
import { createLogger, errorMapperInterceptor } from "@vmenv/rpc";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { BlockManager } from "../packages/agent/src/block/manager.js";
import { blockService, packResult } from "../packages/agent/src/block/rpc.js";
import { toPbOperation } from "../packages/agent/src/diagnostics/convert.js";
import { Operations } from "../packages/agent/src/diagnostics/operations.js";

const run = promisify(execFile);
const MiB = 1024n * 1024n;

interface ImgInfo {
  format: string;
  "virtual-size": number;
  "backing-filename"?: string;
  "full-backing-filename"?: string;
  snapshots?: { name: string }[];
}
const info = async (path: string): Promise<ImgInfo> =>
  JSON.parse((await run("qemu-img", ["info", "--output=json", "-U", path])).stdout);
/** Writes a byte pattern into an image with qemu-io (what a guest would do). */
const fill = (path: string, fmt: string, byte: number) =>
  run("qemu-io", ["-f", fmt, "-c", `write -P ${byte} 0 64k`, path]);
/** Whether the first 64 KiB of an image hold the pattern. */
const holds = async (path: string, fmt: string, byte: number) => {
  const r = await run("qemu-io", ["-f", fmt, "-r", "-U", "-c", `read -P ${byte} 0 64k`, path]);
  return !/Pattern verification failed/.test(r.stdout);
};

/** The code and ErrorInfo of a failed call. */
async function failure(
  p: Promise<unknown>,
): Promise<{ code: Code; reason: string; meta: Record<string, string> }> {
  try {
    await p;
  } catch (e) {
    const ce = ConnectError.from(e);
    const ei = ce.findDetails(ErrorInfoSchema)[0];
    return { code: ce.code, reason: ei?.reason ?? "", meta: { ...ei?.metadata } };
  }
  throw new Error("expected the call to fail");
}

describe("block service on real qemu-img", () => {
  let dir: string;
  let stateDir: string;
  let ops: Operations;
  let users: Map<string, string[]>;
  let m: BlockManager;
  let c: ReturnType<typeof createClient<typeof BlockService>>;
  const logger = createLogger("block-test", "silent");

  async function boot() {
    ops = new Operations();
    m = new BlockManager({
      stateDir,
      operations: ops,
      volumeUsers: (n) => users.get(n) ?? [],
      logger,
    });
    await m.init();
    const b = blockService(m);
    const transport = createRouterTransport(({ service }) => service(BlockService, b.impl as never), {
      router: { interceptors: [errorMapperInterceptor(logger)] },
    });
    c = createClient(BlockService, transport);
  }

  /** Waits for an operation; returns it when it succeeded, throws its error otherwise. */
  async function done(op: Operation): Promise<Operation> {
    const o = await ops.wait(op.id, 60_000);
    if (o.state !== "succeeded") throw o.error ?? new Error(`operation ${o.id} is ${o.state}`);
    return toPbOperation(o, packResult);
  }
  const volumeOf = async (op: Operation) => {
    await done(op);
    const r = (await c.getVolume({ name: op.target })) ?? undefined;
    return r;
  };
  const create = (id: string, sizeBytes: bigint, format = VolumeFormat.QCOW2, store = "") =>
    c.createVolume({ volumeId: id, volume: { sizeBytes, format, store } });

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), "vmenv-block-"));
    stateDir = join(dir, "state");
    users = new Map();
    await boot();
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it("has a default store at <state>/volumes with the filesystem's figures", async () => {
    const s = await c.getStore({ name: "stores/default" });
    expect(s.path).toBe(join(stateDir, "volumes"));
    expect(s.capacityBytes).toBeGreaterThan(0n);
    expect(s.freeBytes).toBeLessThanOrEqual(s.capacityBytes);
    expect(s.volumeCount).toBe(0);
    expect((await c.listStores({})).stores.map((x) => x.name)).toEqual(["stores/default"]);
  });

  it("creates qcow2 and raw volumes, idempotently, and lists and deletes them", async () => {
    const q = await volumeOf(await create("disk-a", 64n * MiB));
    expect(q.state).toBe(VolumeState.READY);
    expect(q.path).toBe(join(stateDir, "volumes", "disk-a.qcow2"));
    expect(await info(q.path)).toMatchObject({ format: "qcow2", "virtual-size": Number(64n * MiB) });
    const r = await volumeOf(await create("disk-b", 8n * MiB, VolumeFormat.RAW));
    expect(await info(r.path)).toMatchObject({ format: "raw", "virtual-size": Number(8n * MiB) });

    // The same create again changes nothing; a different spec is ALREADY_EXISTS.
    const again = await done(await create("disk-a", 64n * MiB));
    expect(anyUnpack(again.result ?? ({} as never), VolumeSchema)?.name ?? "volumes/disk-a").toBe(
      "volumes/disk-a",
    );
    expect(await failure(create("disk-a", 128n * MiB))).toMatchObject({
      code: Code.AlreadyExists,
      reason: "VOLUME_ALREADY_EXISTS",
      meta: { volume: "volumes/disk-a" },
    });

    const page1 = await c.listVolumes({ pageSize: 1 });
    expect(page1.volumes.map((v) => v.name)).toEqual(["volumes/disk-a"]);
    const page2 = await c.listVolumes({ pageSize: 1, pageToken: page1.nextPageToken });
    expect(page2.volumes.map((v) => v.name)).toEqual(["volumes/disk-b"]);
    expect(page2.nextPageToken).toBe("");

    const s = await c.getStore({ name: "stores/default" });
    expect(s.volumeCount).toBe(2);
    expect(s.provisionedBytes).toBe(72n * MiB);

    await done(await c.deleteVolume({ name: "volumes/disk-b" }));
    expect(await failure(c.getVolume({ name: "volumes/disk-b" }))).toMatchObject({
      code: Code.NotFound,
      reason: "VOLUME_NOT_FOUND",
    });
    expect((await readdir(join(stateDir, "volumes"))).sort()).toEqual(["disk-a.json", "disk-a.qcow2"]);
  });

  it("refuses to delete or resize a volume in use, naming the VM, and filters by user", async () => {
    await volumeOf(await create("used", 16n * MiB));
    await volumeOf(await create("free", 16n * MiB));
    users.set("volumes/used", ["vms/web-1"]);
    const del = await failure(c.deleteVolume({ name: "volumes/used" }));
    expect(del).toMatchObject({
      code: Code.FailedPrecondition,
      reason: "VOLUME_IN_USE",
      meta: { volume: "volumes/used", vm: "vms/web-1" },
    });
    // A volume in use still grows: here no VMM has it open (the VM is declared, not running), so
    // qemu-img grows the file; the live path is tested with real guests (block-backends).
    await done(await c.resizeVolume({ name: "volumes/used", sizeBytes: 32n * MiB }));
    expect((await c.getVolume({ name: "volumes/used" })).sizeBytes).toBe(32n * MiB);
    const mine = await c.listVolumes({ usedBy: "vms/web-1" });
    expect(mine.volumes.map((v) => [v.name, v.usedBy])).toEqual([["volumes/used", ["vms/web-1"]]]);
    expect(await m.resolve("volumes/used")).toMatchObject({ format: "qcow2", sizeBytes: 32n * MiB });
    users.clear();
    await done(await c.deleteVolume({ name: "volumes/used" }));
  });

  it("makes a linked clone independent of its source, and refuses to delete a source with clones", async () => {
    const src = await volumeOf(await create("base", 32n * MiB));
    await fill(src.path, "qcow2", 0xaa);
    const clone = await volumeOf(
      await c.cloneVolume({ source: "volumes/base", volumeId: "copy", linked: true }),
    );
    expect(clone.backing).toBe("volumes/base");
    expect(clone.format).toBe(VolumeFormat.QCOW2);
    const ci = await info(clone.path);
    const si = await info(src.path);
    // Both read from the same frozen base; the source kept its path.
    expect(ci["full-backing-filename"]).toBe(si["full-backing-filename"]);
    expect(ci["full-backing-filename"]).toMatch(/base\.base-0\.qcow2$/);
    // Later writes to either do not reach the other.
    await fill(src.path, "qcow2", 0xbb);
    expect(await holds(clone.path, "qcow2", 0xaa)).toBe(true);
    await fill(clone.path, "qcow2", 0xcc);
    expect(await holds(src.path, "qcow2", 0xbb)).toBe(true);

    expect(await failure(c.deleteVolume({ name: "volumes/base" }))).toMatchObject({
      code: Code.FailedPrecondition,
      reason: "VOLUME_HAS_CLONES",
      meta: { volume: "volumes/base", clone: "volumes/copy" },
    });
    // A full copy of a raw volume has the raw format and no backing file.
    const raw = await volumeOf(await create("rawsrc", 8n * MiB, VolumeFormat.RAW));
    await fill(raw.path, "raw", 0x11);
    const full = await volumeOf(await c.cloneVolume({ source: "volumes/rawsrc", volumeId: "rawcopy" }));
    expect(await info(full.path)).toMatchObject({ format: "raw", "virtual-size": Number(8n * MiB) });
    expect(await holds(full.path, "raw", 0x11)).toBe(true);
    expect(
      await failure(c.cloneVolume({ source: "volumes/rawsrc", volumeId: "l2", linked: true })),
    ).toMatchObject({
      code: Code.FailedPrecondition,
      reason: "VOLUME_FORMAT_UNSUPPORTED",
    });

    await done(await c.deleteVolume({ name: "volumes/copy" }));
    await done(await c.deleteVolume({ name: "volumes/base" }));
    expect((await readdir(join(stateDir, "volumes"))).filter((f) => f.startsWith("base"))).toEqual([]);
  });

  it("grows volumes, refuses to shrink, and imports images", async () => {
    const v = await volumeOf(await create("grow", 16n * MiB));
    await done(await c.resizeVolume({ name: "volumes/grow", sizeBytes: 48n * MiB }));
    expect((await info(v.path))["virtual-size"]).toBe(Number(48n * MiB));
    expect((await c.getVolume({ name: "volumes/grow" })).sizeBytes).toBe(48n * MiB);
    expect(await failure(c.resizeVolume({ name: "volumes/grow", sizeBytes: 16n * MiB }))).toMatchObject({
      code: Code.InvalidArgument,
      reason: "VOLUME_SHRINK_REFUSED",
    });

    const image = join(dir, "image.raw");
    await run("qemu-img", ["create", "-q", "-f", "raw", image, String(4n * MiB)]);
    await fill(image, "raw", 0x42);
    const imp = await volumeOf(
      await c.importVolume({ volumeId: "imported", volume: { sizeBytes: 8n * MiB }, sourceUri: image }),
    );
    expect(imp.source).toBe(image);
    expect(await info(imp.path)).toMatchObject({ format: "qcow2", "virtual-size": Number(8n * MiB) });
    expect(await holds(imp.path, "qcow2", 0x42)).toBe(true);

    // A wrong checksum fails the operation with DATA_LOSS and leaves nothing.
    const bad = await c.importVolume({
      volumeId: "badsum",
      volume: {},
      sourceUri: image,
      sourceSha256: "0".repeat(64),
    });
    await ops.wait(bad.id, 60_000);
    const failed = (await c
      .getVolume({ name: "volumes/badsum" })
      .catch((e) => ConnectError.from(e))) as ConnectError;
    expect(failed.code).toBe(Code.NotFound);
    expect(ops.get(bad.id).state).toBe("failed");
    expect((await readdir(join(stateDir, "volumes"))).filter((f) => f.startsWith("badsum"))).toEqual([]);
  });

  it("answers bad input with clear errors and leaves nothing behind", async () => {
    const before = await readdir(join(stateDir, "volumes"));
    const cases: [() => Promise<unknown>, Code, string, Record<string, string>?][] = [
      [() => create("zero", 0n), Code.InvalidArgument, "INVALID_ARGUMENT", { field: "volume.size_bytes" }],
      [() => create("odd", 1000n), Code.InvalidArgument, "INVALID_ARGUMENT", { field: "volume.size_bytes" }],
      [
        () => create("huge", 1n << 60n),
        Code.ResourceExhausted,
        "STORE_CAPACITY_EXCEEDED",
        { store: "stores/default" },
      ],
      [() => create("../x", MiB), Code.InvalidArgument, "INVALID_VOLUME_ID", { field: "volume_id" }],
      [() => create("a;rm -rf", MiB), Code.InvalidArgument, "INVALID_VOLUME_ID"],
      [() => create("$(id)", MiB), Code.InvalidArgument, "INVALID_VOLUME_ID"],
      [
        () => create("fmt", MiB, 7 as VolumeFormat),
        Code.InvalidArgument,
        "INVALID_VOLUME_FORMAT",
        { field: "volume.format" },
      ],
      [() => create("nostore", MiB, VolumeFormat.QCOW2, "stores/nope"), Code.NotFound, "STORE_NOT_FOUND"],
      [
        () => c.createStore({ storeId: "rel", store: { path: "relative/dir" } }),
        Code.InvalidArgument,
        "INVALID_ARGUMENT",
        { field: "store.path" },
      ],
      [
        () => c.createStore({ storeId: "dots", store: { path: "/tmp/../etc" } }),
        Code.InvalidArgument,
        "INVALID_ARGUMENT",
      ],
      [
        () => c.createStore({ storeId: "Bad_Id", store: { path: join(dir, "s") } }),
        Code.InvalidArgument,
        "INVALID_STORE_ID",
      ],
      [
        () => c.importVolume({ volumeId: "missing", volume: {}, sourceUri: join(dir, "no-such.img") }),
        Code.NotFound,
        "IMPORT_SOURCE_NOT_FOUND",
        { source_uri: join(dir, "no-such.img") },
      ],
      [
        () => c.importVolume({ volumeId: "relimp", volume: {}, sourceUri: "images/x.qcow2" }),
        Code.InvalidArgument,
        "INVALID_ARGUMENT",
        { field: "source_uri" },
      ],
      [() => c.getVolume({ name: "volumes/../../etc" }), Code.InvalidArgument, "INVALID_VOLUME_ID"],
      [
        () => c.cloneVolume({ source: "volumes/none", volumeId: "c1" }),
        Code.NotFound,
        "VOLUME_NOT_FOUND",
        { volume: "volumes/none" },
      ],
    ];
    for (const [call, code, reason, meta] of cases) {
      const f = await failure(call());
      expect(f, reason).toMatchObject({ code, reason, ...(meta ? { meta } : {}) });
    }
    expect(await readdir(join(stateDir, "volumes"))).toEqual(before);
    expect((await c.listVolumes({})).volumes).toEqual([]);
    expect((await c.listStores({})).stores.map((s) => s.name)).toEqual(["stores/default"]);
    // An import of a file that is no image of the format given fails in its operation and leaves nothing.
    const junk = join(dir, "junk.qcow2");
    await writeFile(junk, "not an image");
    expect(
      await failure(
        c.importVolume({ volumeId: "junk", volume: {}, sourceUri: junk, sourceFormat: VolumeFormat.QCOW2 }),
      ),
    ).toMatchObject({ code: Code.InvalidArgument, reason: "IMPORT_SOURCE_UNREADABLE" });
    expect(await readdir(join(stateDir, "volumes"))).toEqual(before);
    // The port the VM side uses answers with the domain error the RPC edge maps to NOT_FOUND.
    await expect(m.resolve("volumes/ghost")).rejects.toMatchObject({
      code: "not-found",
      reason: "VOLUME_NOT_FOUND",
      metadata: { volume: "volumes/ghost" },
    });
  });

  it("keeps stores: one path per store, no delete while they hold volumes", async () => {
    const path = join(dir, "fast");
    const s = await c.createStore({ storeId: "fast", store: { path, labels: { media: "nvme" } } });
    expect(s).toMatchObject({ name: "stores/fast", path, volumeCount: 0 });
    // Same again: no change; a different ask: ALREADY_EXISTS; the same path under another id: refused.
    await c.createStore({ storeId: "fast", store: { path, labels: { media: "nvme" } } });
    expect(
      await failure(c.createStore({ storeId: "fast", store: { path: join(dir, "other") } })),
    ).toMatchObject({
      code: Code.AlreadyExists,
    });
    expect(await failure(c.createStore({ storeId: "again", store: { path: `${path}/` } }))).toMatchObject({
      code: Code.AlreadyExists,
      reason: "STORE_PATH_IN_USE",
      meta: { store: "stores/fast" },
    });
    const v = await volumeOf(await create("in-fast", 4n * MiB, VolumeFormat.RAW, "stores/fast"));
    expect(v.path).toBe(join(path, "in-fast.raw"));
    expect((await c.listVolumes({ store: "stores/fast" })).volumes.map((x) => x.name)).toEqual([
      "volumes/in-fast",
    ]);
    expect(await failure(c.deleteStore({ name: "stores/fast" }))).toMatchObject({
      code: Code.FailedPrecondition,
      reason: "STORE_NOT_EMPTY",
      meta: { store: "stores/fast", volume: "volumes/in-fast" },
    });
    await done(await c.deleteVolume({ name: "volumes/in-fast" }));
    await c.deleteStore({ name: "stores/fast" });
    expect((await c.listStores({})).stores.map((x) => x.name)).toEqual(["stores/default"]);
  });

  it("finds its volumes again after a restart and cleans a half-created one", async () => {
    await volumeOf(await create("keep", 8n * MiB));
    const path = join(dir, "fast");
    await c.createStore({ storeId: "fast", store: { path } });
    await volumeOf(await create("there", 4n * MiB, VolumeFormat.RAW, "stores/fast"));
    // A create cut short: its record says creating, its file is half there.
    const half = join(stateDir, "volumes", "half.qcow2");
    await run("qemu-img", ["create", "-q", "-f", "qcow2", half, "1M"]);
    const rec = JSON.parse((await run("cat", [join(stateDir, "volumes", "keep.json")])).stdout) as {
      volume: Record<string, unknown>;
    };
    rec.volume = { ...rec.volume, id: "half", path: half, state: "creating" };
    await writeFile(join(stateDir, "volumes", "half.json"), JSON.stringify(rec));

    await boot();
    expect((await c.listVolumes({})).volumes.map((v) => [v.name, v.state])).toEqual([
      ["volumes/keep", VolumeState.READY],
      ["volumes/there", VolumeState.READY],
    ]);
    expect((await readdir(join(stateDir, "volumes"))).sort()).toEqual(["keep.json", "keep.qcow2"]);
    expect((await c.getStore({ name: "stores/fast" })).volumeCount).toBe(1);
  });

  it("snapshots qcow2 volumes and clones from a snapshot", async () => {
    const v = await volumeOf(await create("snappy", 16n * MiB));
    await fill(v.path, "qcow2", 0x01);
    const sop = await done(
      await c.snapshotVolume({ name: "volumes/snappy", snapshotId: "s1", labels: { a: "b" } }),
    );
    const snap = await ops.wait(sop.id, 1000);
    expect(snap.state).toBe("succeeded");
    expect((await info(v.path)).snapshots?.map((s) => s.name)).toEqual(["s1"]);
    await fill(v.path, "qcow2", 0x02);
    const list = await c.listVolumeSnapshots({ parent: "volumes/snappy" });
    expect(list.volumeSnapshots.map((s) => [s.name, s.sizeBytes, s.labels])).toEqual([
      ["volumes/snappy/snapshots/s1", 16n * MiB, { a: "b" }],
    ]);
    // A full copy and a linked clone of the snapshot both hold its content, not the later write.
    const full = await volumeOf(
      await c.cloneVolume({ source: "volumes/snappy/snapshots/s1", volumeId: "from-s1" }),
    );
    expect(await holds(full.path, "qcow2", 0x01)).toBe(true);
    const linked = await volumeOf(
      await c.cloneVolume({ source: "volumes/snappy/snapshots/s1", volumeId: "linked-s1", linked: true }),
    );
    expect(linked.backing).toBe("volumes/snappy/snapshots/s1");
    expect((await info(linked.path))["full-backing-filename"]).toMatch(/snappy\.base-\d+\.qcow2$/);
    expect(await holds(linked.path, "qcow2", 0x01)).toBe(true);
    expect(await holds(v.path, "qcow2", 0x02)).toBe(true);
    const withClones = await c.listVolumeSnapshots({ parent: "volumes/-" });
    expect(withClones.volumeSnapshots[0]?.clones).toEqual(["volumes/linked-s1"]);
    const packed = (await c.snapshotVolume({ name: "volumes/snappy", snapshotId: "s1", labels: { a: "b" } }))
      .result;
    expect(packed && anyUnpack(packed, VolumeSnapshotSchema)?.name).toBe("volumes/snappy/snapshots/s1");

    expect(await failure(c.deleteVolumeSnapshot({ name: "volumes/snappy/snapshots/s1" }))).toMatchObject({
      code: Code.FailedPrecondition,
      reason: "VOLUME_SNAPSHOT_HAS_CLONES",
    });
    expect(await failure(c.deleteVolume({ name: "volumes/snappy" }))).toMatchObject({
      reason: "VOLUME_HAS_CLONES",
    });
    await done(await c.deleteVolume({ name: "volumes/linked-s1" }));
    expect(await failure(c.deleteVolume({ name: "volumes/snappy" }))).toMatchObject({
      code: Code.FailedPrecondition,
      reason: "VOLUME_HAS_SNAPSHOTS",
    });
    await c.deleteVolumeSnapshot({ name: "volumes/snappy/snapshots/s1" });
    expect((await info(v.path)).snapshots ?? []).toEqual([]);
    await done(await c.deleteVolume({ name: "volumes/snappy" }));

    const raw = await volumeOf(await create("rawsnap", MiB, VolumeFormat.RAW));
    expect(raw.format).toBe(VolumeFormat.RAW);
    expect(await failure(c.snapshotVolume({ name: "volumes/rawsnap", snapshotId: "s" }))).toMatchObject({
      code: Code.FailedPrecondition,
      reason: "VOLUME_FORMAT_UNSUPPORTED",
    });
    expect(OperationState.SUCCEEDED).toBeDefined();
  });
});
