import { Code, ConnectError } from "@connectrpc/connect";
import { VmState, WatchEventType, type WatchVmsResponse } from "@vmenv/api/agent/v1";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type RunningAgent, startAgent } from "./support/agent.js";
import { clients, done, guestVm } from "./support/vm.js";

/** Collects `n` events of a WatchVms stream, then cancels it. */
async function take(
  c: ReturnType<typeof clients>,
  req: Parameters<ReturnType<typeof clients>["vms"]["watchVms"]>[0],
  n: number,
  during?: () => Promise<void>,
): Promise<WatchVmsResponse[]> {
  const ac = new AbortController();
  const got: WatchVmsResponse[] = [];
  const reading = (async () => {
    try {
      for await (const ev of c.vms.watchVms(req, { signal: ac.signal, timeoutMs: 0 })) {
        got.push(ev);
        if (got.length === n) ac.abort();
      }
    } catch (e) {
      if (!ac.signal.aborted) throw e;
    }
  })();
  await during?.();
  const t = setTimeout(() => ac.abort(), 10_000);
  await reading;
  clearTimeout(t);
  return got;
}

describe("WatchVms", () => {
  let agent: RunningAgent;
  let c: ReturnType<typeof clients>;
  beforeAll(async () => {
    agent = await startAgent(["--kvm-probe-timeout-ms", "200"]);
    c = clients(agent.socket);
    for (const [id, tier] of [
      ["w1", "web"],
      ["w2", "db"],
    ] as const) {
      await done(c, await c.vms.createVm({ ...(await guestVm(id, { labels: { tier } })), start: false }));
    }
  });
  afterAll(async () => {
    await agent?.stop();
  });

  it("sends a snapshot, SYNCED, then changes, each with a resume token; filters by label", async () => {
    const label = (id: string, v: string) =>
      c.vms.updateVm({
        vm: { name: `vms/${id}`, labels: { tier: "web", v } },
        updateMask: { paths: ["labels"] },
      });
    const evs = await take(c, { labels: { tier: "web" } }, 3, async () => {
      await new Promise((r) => setTimeout(r, 200));
      await label("w1", "2");
    });
    expect(evs.map((e) => [e.type, e.vm?.name])).toEqual([
      [WatchEventType.INITIAL, "vms/w1"],
      [WatchEventType.SYNCED, undefined],
      [WatchEventType.UPDATED, "vms/w1"],
    ]);
    expect(evs[0]?.vm?.state).toBe(VmState.STOPPED);
    // Resuming after the SYNCED event replays what came after it, without a snapshot.
    const token = evs[1]?.resumeToken ?? "";
    const resumed = await take(c, { resumeToken: token }, 2, () => label("w1", "3").then(() => undefined));
    expect(resumed.map((e) => [e.type, e.vm?.labels.v])).toEqual([
      [WatchEventType.UPDATED, "2"],
      [WatchEventType.UPDATED, "3"],
    ]);
    expect(Number(resumed[1]?.resumeToken)).toBeGreaterThan(Number(resumed[0]?.resumeToken));
  });

  it("refuses a resume token it never gave with OUT_OF_RANGE", async () => {
    const e = await take(c, { resumeToken: "999999" }, 1).then(
      () => undefined,
      (x) => ConnectError.from(x),
    );
    expect(e?.code).toBe(Code.OutOfRange);
    expect(e?.rawMessage).toMatch(/resume token/);
  });
});
