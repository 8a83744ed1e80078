import { describe, expect, it } from "vitest";
import { type DeviceState, type DiskDevice, freeSlot, plan } from "./devices.js";

const disk = (id: string, volume = `volumes/${id}`): DiskDevice => ({
  kind: "disk",
  id,
  volume,
  readOnly: false,
  serial: "",
});
const state = (d: DiskDevice, bound: boolean, slot?: number): DeviceState => ({ device: d, bound, slot });

describe("device change planning", () => {
  it("joins, binds, unbinds and leaves, and says NOOP when it is already so", () => {
    const d = disk("data");
    expect(plan("vms/a", [], { action: "join", deviceId: "data", device: d })).toEqual({
      kind: "join",
      device: d,
    });
    expect(plan("vms/a", [state(d, false)], { action: "join", deviceId: "data", device: d })).toEqual({
      kind: "noop",
    });
    expect(plan("vms/a", [], { action: "bind", deviceId: "data", device: d })).toEqual({
      kind: "bind",
      device: d,
      join: true,
    });
    expect(
      plan("vms/a", [state(d, false)], { action: "bind", deviceId: "data", device: undefined }),
    ).toMatchObject({ kind: "bind", join: false });
    expect(plan("vms/a", [state(d, true)], { action: "bind", deviceId: "data", device: d })).toEqual({
      kind: "noop",
    });
    expect(
      plan("vms/a", [state(d, true)], { action: "unbind", deviceId: "data", device: undefined }),
    ).toMatchObject({ kind: "unbind" });
    expect(
      plan("vms/a", [state(d, false)], { action: "unbind", deviceId: "data", device: undefined }),
    ).toEqual({ kind: "noop" });
    expect(
      plan("vms/a", [state(d, true)], { action: "leave", deviceId: "data", device: undefined }),
    ).toMatchObject({ kind: "leave", unbind: true });
    expect(plan("vms/a", [], { action: "leave", deviceId: "data", device: undefined })).toEqual({
      kind: "noop",
    });
  });

  it("refuses a different device under the same id, a bare id it does not know, and a JOIN without the device", () => {
    const other = plan("vms/a", [state(disk("data"), false)], {
      action: "join",
      deviceId: "data",
      device: disk("data", "volumes/x"),
    });
    expect(other).toMatchObject({ kind: "error", error: { code: "already-exists" } });
    expect(plan("vms/a", [], { action: "bind", deviceId: "nope", device: undefined })).toMatchObject({
      kind: "error",
      error: { code: "not-found" },
    });
    expect(plan("vms/a", [], { action: "join", deviceId: "x", device: undefined })).toMatchObject({
      kind: "error",
      error: { code: "invalid-argument" },
    });
  });

  it("picks the lowest free PCIe root port", () => {
    expect(freeSlot([state(disk("a"), true, 0), state(disk("b"), true, 2)], 4)).toBe(1);
    expect(freeSlot([state(disk("a"), true, 0)], 1)).toBeUndefined();
  });
});
