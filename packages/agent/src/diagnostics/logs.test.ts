import { createLogger } from "@vmenv/rpc";
import { describe, expect, it } from "vitest";
import { operationContext, operationLogFields } from "./context.js";
import { LogRing, parseLogLine } from "./logs.js";

const sink = { write: () => true };

describe("LogRing", () => {
  it("gets every line of a logger teed into it, with the operation it was logged for", async () => {
    const ring = new LogRing(100);
    const logger = createLogger("t", "debug", sink as never, { tee: ring, mixin: operationLogFields });
    logger.debug({ vm: "vms/web", pid: 7 }, "re-adopted VM");
    await operationContext.run({ operation: "operations/op1", target: "vms/db", active: true }, async () => {
      await Promise.resolve();
      logger.warn({ reason: "X" }, "inside an operation");
    });
    logger.info({ method: "/vmenv.agent.v1.VmService/GetVm", code: "ok" }, "rpc");
    const [a, b, c] = ring.entries();
    expect(a).toMatchObject({ level: "debug", component: "vm", target: "vms/web", message: "re-adopted VM" });
    expect(a?.attributes).toMatchObject({ vm: "vms/web", pid: "7" });
    expect(b).toMatchObject({ level: "warn", operation: "operations/op1", target: "vms/db" });
    expect(c?.component).toBe("rpc");
    expect(ring.replay({ minLevel: "info" }, { last: 0 }).map((e) => e.message)).toEqual([
      "inside an operation",
      "rpc",
    ]);
    expect(ring.replay({ minLevel: "debug", operation: "operations/op1" }, { last: 0 })).toHaveLength(1);
    expect(ring.replay({ minLevel: "debug" }, { last: 1 }).map((e) => e.message)).toEqual(["rpc"]);
  });

  it("keeps the last `limit` lines, and joins lines split across writes", () => {
    const ring = new LogRing(2);
    const line = (n: number) => `${JSON.stringify({ level: 30, time: n, msg: `m${n}` })}\n`;
    ring.write(line(1) + line(2).slice(0, 10));
    ring.write(line(2).slice(10) + line(3));
    expect(ring.entries().map((e) => e.message)).toEqual(["m2", "m3"]);
    expect(ring.replay({ minLevel: "info" }, { sinceMs: 3, last: 0 }).map((e) => e.message)).toEqual(["m3"]);
    expect(parseLogLine("not json")).toBeUndefined();
  });
});

describe("lines logged on behalf of an operation", () => {
  it("carry its id while it runs, and no longer once it has ended (work it started may outlive it)", async () => {
    const { Operations } = await import("./operations.js");
    const ring = new LogRing(100);
    const logger = createLogger("t", "info", sink as never, { tee: ring, mixin: operationLogFields });
    const ops = new Operations();
    let later: () => void = () => undefined;
    const op = ops.start("vm.create", "vms/w", async () => {
      logger.info("during");
      // A watcher set up by the operation, which fires after it ended (a VMM exiting, say).
      later = () => setImmediate(() => logger.info("after"));
    });
    await ops.wait(op.id, 1000);
    later();
    await new Promise((r) => setTimeout(r, 20));
    const by = Object.fromEntries(ring.entries().map((e) => [e.message, e.operation]));
    expect(by.during).toBe(`operations/${op.id}`);
    expect(by.after).toBe("");
  });
});
