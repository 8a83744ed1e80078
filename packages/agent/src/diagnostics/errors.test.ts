import { failedPrecondition } from "@vmenv/rpc/errors";
import { describe, expect, it } from "vitest";
import { ErrorLog } from "./errors.js";
import type { OperationRecord } from "./operations.js";

const op = (id: string, target: string, endTimeMs: number): OperationRecord => ({
  id,
  kind: "vm.create",
  target,
  state: "failed",
  percent: 10,
  stage: "failed",
  mayCancel: false,
  createTimeMs: endTimeMs - 5,
  startTimeMs: endTimeMs - 5,
  endTimeMs,
  error: undefined,
  result: undefined,
  requestId: undefined,
});

describe("ErrorLog", () => {
  it("records failed operations with reason, element and operation, and filters them newest first", () => {
    const log = new ErrorLog(() => 0, 3);
    log.recordOperation(
      op("a", "vms/web", 100),
      failedPrecondition("vms/web has no free hotplug slot left", "NO_HOTPLUG_SLOT", {
        vm: "vms/web",
        device: "disk-9",
      }),
    );
    log.recordOperation(op("b", "vms/db", 200), new Error("ENOSPC: no space left on device"));
    const [internal, slot] = log.list();
    expect(slot).toMatchObject({
      reason: "NO_HOTPLUG_SLOT",
      element: "disk-9",
      operation: "operations/a",
      target: "vms/web",
    });
    expect(slot?.message).toMatch(/vm.create of vms\/web failed: vms\/web has no free hotplug slot/);
    // An unexpected error's cause is not repeated: the message says where to look.
    expect(internal?.reason).toBe("INTERNAL");
    expect(internal?.message).not.toMatch(/ENOSPC/);
    expect(internal?.message).toMatch(/vmenv logs --operation operations\/b/);
    expect(log.list({ target: "vms/web" }).map((e) => e.operation)).toEqual(["operations/a"]);
    expect(log.list({ reasons: ["INTERNAL"] }).map((e) => e.operation)).toEqual(["operations/b"]);
    expect(log.list({ startMs: 150 }).map((e) => e.operation)).toEqual(["operations/b"]);
    expect(log.list({ endMs: 150 }).map((e) => e.operation)).toEqual(["operations/a"]);
  });

  it("keeps only the latest `limit` records", () => {
    const log = new ErrorLog(() => 0, 3);
    for (let i = 0; i < 5; i++) log.recordOperation(op(`o${i}`, "vms/x", i), new Error("x"));
    expect(log.list().map((e) => e.operation)).toEqual(["operations/o4", "operations/o3", "operations/o2"]);
  });
});
