import { VmenvError } from "@vmenv/rpc/errors";
import { describe, expect, it } from "vitest";
import { type Usage, ZERO_USAGE } from "../domain/usage.js";
import {
  type AffinityRuleSpec,
  type PlacementCandidate,
  type PlacementRequest,
  place,
  placeAll,
} from "./place.js";

const GIB = 1024n ** 3n;

function usage(vcpus: number, memGib: number, gpus = 0, gpuMemGib = 0): Usage {
  return {
    ...ZERO_USAGE,
    vms: vcpus > 0 ? 1 : 0,
    vcpus,
    memoryBytes: BigInt(memGib) * GIB,
    gpus,
    gpuMemoryBytes: BigInt(gpuMemGib) * GIB,
  };
}

function agent(id: string, over: Partial<PlacementCandidate> = {}): PlacementCandidate {
  return {
    id,
    state: "ready",
    labels: {},
    capacity: { vcpus: 8, memoryBytes: 16n * GIB, gpus: 0, gpuMemoryBytes: 0n },
    allocated: { ...ZERO_USAGE },
    networks: ["networks/lan"],
    ...over,
  };
}

function req(memberId: string, over: Partial<PlacementRequest> = {}): PlacementRequest {
  return {
    memberId,
    role: memberId.replace(/-\d+$/, ""),
    need: usage(2, 2),
    agentLabels: {},
    requiredLabels: {},
    networks: [],
    rules: [],
    peers: [],
    strategy: "binpack",
    ...over,
  };
}

const rule = (over: Partial<AffinityRuleSpec>): AffinityRuleSpec => ({
  type: "anti-affinity",
  enforcement: "hard",
  memberIds: [],
  roles: [],
  weight: 1,
  ...over,
});

function refusal(fn: () => unknown): VmenvError {
  try {
    fn();
  } catch (err) {
    if (err instanceof VmenvError) return err;
    throw err;
  }
  throw new Error("expected a refusal");
}

describe("place: filters", () => {
  it("names one reason per agent when nothing fits", () => {
    const err = refusal(() =>
      place(
        req("web-2", {
          need: usage(4, 2),
          rules: [rule({ roles: ["web"] })],
          peers: [{ memberId: "web-1", role: "web", agent: "a2" }],
        }),
        [
          agent("a1", { state: "cordoned" }),
          agent("a2"),
          agent("a3", { allocated: usage(6, 1) }),
          agent("a4", { state: "down" }),
        ],
      ),
    );
    expect(err.code).toBe("failed-precondition");
    expect(err.reason).toBe("NO_AGENT_FITS");
    expect(err.metadata).toEqual({ member: "web-2" });
    expect(err.message).toBe(
      "no agent fits member web-2: a1: cordoned; a2: anti-affinity with web-1 (role web); a3: 2 vCPUs free, 4 needed; a4: down",
    );
  });

  it("is RESOURCE_EXHAUSTED when only room is missing, and names memory, GPUs and GPU memory", () => {
    const mem = refusal(() =>
      place(req("db-1", { need: usage(1, 4) }), [agent("a1", { allocated: usage(1, 13) })]),
    );
    expect(mem.code).toBe("resource-exhausted");
    expect(mem.message).toContain("a1: 3 GiB memory free, 4 GiB needed");
    const gpu = refusal(() => place(req("ml-1", { need: usage(1, 1, 1, 0) }), [agent("a1")]));
    expect(gpu.message).toContain("a1: 0 GPUs free, 1 needed");
    const gpuMem = refusal(() =>
      place(req("ml-1", { need: usage(1, 1, 1, 40) }), [
        agent("a1", { capacity: { vcpus: 8, memoryBytes: 16n * GIB, gpus: 2, gpuMemoryBytes: 32n * GIB } }),
      ]),
    );
    expect(gpuMem.message).toContain("a1: 32 GiB GPU memory free, 40 GiB needed");
  });

  it("filters on the member's labels, the node policy's labels and networks", () => {
    const cands = [
      agent("a1", { labels: { zone: "a" } }),
      agent("a2", { labels: { zone: "b", disk: "hdd" } }),
      agent("a3", { labels: { zone: "b", disk: "ssd" }, networks: [] }),
      agent("a4", { labels: { zone: "b", disk: "ssd" }, networks: ["networks/lan", "networks/db"] }),
    ];
    const r = req("db-1", {
      agentLabels: { zone: "b" },
      requiredLabels: { disk: "ssd" },
      networks: ["networks/db"],
    });
    expect(place(r, cands).agent).toBe("a4");
    const err = refusal(() => place(r, cands.slice(0, 3)));
    expect(err.message).toBe(
      "no agent fits member db-1: a1: label zone=b required by the member (has zone=a); " +
        "a2: label disk=ssd required by the node policy (has disk=hdd); a3: networks/db not present",
    );
  });

  it("honours a pinned agent, even when another one scores better", () => {
    const cands = [agent("a1", { allocated: usage(4, 4) }), agent("a2")];
    expect(place(req("web-1"), cands).agent).toBe("a1");
    expect(place(req("web-1", { agent: "a2" }), cands).agent).toBe("a2");
    expect(refusal(() => place(req("web-1", { agent: "a9" }), cands)).message).toBe(
      "no agent fits member web-1: a9: pinned, but not in the fleet",
    );
  });

  it("refuses when the fleet is empty", () => {
    const err = refusal(() => place(req("web-1"), []));
    expect(err.message).toBe("no agent fits member web-1: no agents");
  });
});

describe("place: scores", () => {
  const cands = [
    agent("a1", { allocated: usage(2, 2) }),
    agent("a2", { allocated: usage(6, 10) }),
    agent("a3"),
  ];

  it("bin-packs by default: the fullest agent that fits", () => {
    const c = place(req("web-1"), cands);
    expect(c.agent).toBe("a2");
    expect(c.ranked.map((r) => r.agent)).toEqual(["a2", "a1", "a3"]);
  });

  it("spreads when asked: the emptiest agent", () => {
    expect(place(req("web-1", { strategy: "spread" }), cands).agent).toBe("a3");
  });

  it("breaks ties by agent id, whatever the candidates' order", () => {
    const same = [agent("b"), agent("c"), agent("a")];
    expect(place(req("web-1"), same).agent).toBe("a");
    expect(place(req("web-1", { strategy: "spread" }), same.reverse()).agent).toBe("a");
  });
});

describe("place: affinity", () => {
  const two = [agent("a1"), agent("a2")];

  it("hard affinity keeps a member with its peers (by id); a rule by role never makes a member its own peer", () => {
    const r = req("app-1", {
      rules: [rule({ type: "affinity", memberIds: ["app-1", "db-1"] })],
      peers: [{ memberId: "db-1", role: "db", agent: "a2" }],
    });
    expect(place(r, two).agent).toBe("a2");
    expect(refusal(() => place(r, [agent("a1")])).message).toBe(
      "no agent fits member app-1: a1: affinity with db-1 on a2",
    );
    // A rule by role with the member itself listed as placed (a re-placement) does not exclude its agent.
    const self = req("web-1", {
      rules: [rule({ roles: ["web"] })],
      peers: [{ memberId: "web-1", role: "web", agent: "a1" }],
    });
    expect(place(self, [agent("a1")]).agent).toBe("a1");
  });

  it("rules that do not select the member are ignored", () => {
    const r = req("db-1", {
      rules: [rule({ roles: ["web"] })],
      peers: [{ memberId: "web-1", role: "web", agent: "a1" }],
    });
    expect(place(r, [agent("a1")]).agent).toBe("a1");
  });

  it("soft anti-affinity moves a member away from its peers when it can", () => {
    const r = req("web-2", {
      rules: [rule({ roles: ["web"], enforcement: "soft" })],
      peers: [{ memberId: "web-1", role: "web", agent: "a1" }],
    });
    expect(place(r, two).agent).toBe("a2");
    expect(place(r, [agent("a1")]).agent).toBe("a1");
  });

  it("soft affinity pulls a member to its peers against spread", () => {
    const r = req("app-1", {
      strategy: "spread",
      rules: [rule({ type: "affinity", enforcement: "soft", memberIds: ["app-1", "cache-1"] })],
      peers: [{ memberId: "cache-1", role: "cache", agent: "a2" }],
    });
    expect(place(r, [agent("a1"), agent("a2", { allocated: usage(4, 8) })]).agent).toBe("a2");
  });
});

describe("placeAll", () => {
  const web = (n: number, r: AffinityRuleSpec) =>
    Array.from({ length: n }, (_, i) => req(`web-${i + 1}`, { rules: [r] }));

  it("hard anti-affinity over three members fails on two agents, naming the third member", () => {
    const err = refusal(() => placeAll(web(3, rule({ roles: ["web"] })), [agent("a1"), agent("a2")]));
    expect(err.code).toBe("failed-precondition");
    expect(err.metadata).toEqual({ member: "web-3" });
    expect(err.message).toBe(
      "no agent fits member web-3: a1: anti-affinity with web-1 (role web); a2: anti-affinity with web-2 (role web)",
    );
  });

  it("hard anti-affinity over three members succeeds on three agents, one each", () => {
    const got = placeAll(web(3, rule({ roles: ["web"] })), [agent("a1"), agent("a2"), agent("a3")]);
    expect(got.map((c) => c.agent).sort()).toEqual(["a1", "a2", "a3"]);
  });

  it("soft anti-affinity over three members on two agents places them 2 + 1", () => {
    const got = placeAll(web(3, rule({ roles: ["web"], enforcement: "soft" })), [agent("a1"), agent("a2")]);
    const per = new Map<string, number>();
    for (const c of got) per.set(c.agent, (per.get(c.agent) ?? 0) + 1);
    expect([...per.values()].sort()).toEqual([1, 2]);
  });

  it("counts the room taken by earlier members of the group, and leaves the candidates untouched", () => {
    const cands = [
      agent("a1", { capacity: { vcpus: 4, memoryBytes: 16n * GIB, gpus: 0, gpuMemoryBytes: 0n } }),
    ];
    const err = refusal(() => placeAll([req("a-1"), req("a-2"), req("a-3")], cands));
    expect(err.message).toBe("no agent fits member a-3: a1: 0 vCPUs free, 2 needed");
    expect(err.code).toBe("resource-exhausted");
    expect(cands[0]?.allocated.vcpus).toBe(0);
  });
});
