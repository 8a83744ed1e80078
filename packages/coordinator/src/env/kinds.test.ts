import { VmenvError } from "@vmenv/rpc/errors";
import { describe, expect, it } from "vitest";
import { type EnvSnapshot, type MemberKind, planAdd, planEvent, planRemove } from "./kinds.js";
import type { MemberRecord } from "./model.js";

const spec = {
  vcpus: 2,
  maxVcpus: 4,
  memoryBytes: "268435456",
  disks: [{ id: "root", volume: "volumes/root" }],
};

function member(id: string, role: string, over: Partial<MemberRecord> = {}): MemberRecord {
  return {
    id,
    role,
    kind: "vm",
    priority: 0,
    spec,
    volumes: [],
    placement: null,
    reschedulePolicy: null,
    state: "PENDING",
    stateMessage: "",
    agent: "",
    vm: "",
    outputs: {},
    addedBy: "",
    ...over,
  };
}

const env = (members: MemberRecord[] = []): EnvSnapshot => ({
  id: "shop",
  node: "acme",
  labels: {},
  members,
});
const ids = (ms: { id: string }[]) => ms.map((m) => m.id);

describe("balancer kind", () => {
  it("is added when a role gets its second member, after the role, listing both as upstreams", () => {
    const plan = planAdd(env(), [member("web-1", "web"), member("web-2", "web"), member("db-1", "db")]);
    expect(ids(plan.members)).toEqual(["web-1", "web-2", "db-1", "web-lb"]);
    const lb = plan.members.find((m) => m.id === "web-lb");
    expect(lb).toMatchObject({
      kind: "balancer",
      role: "web-lb",
      priority: 1,
      addedBy: "web-2",
      outputs: { balances: "web", upstreams: "web-1,web-2" },
    });
    // A small VM derived from the role's first member: one vCPU, no disks, no hot-plug ceiling.
    expect(lb?.spec).toEqual({ vcpus: 1, memoryBytes: "268435456" });
    expect(ids(plan.added)).toEqual(["web-1", "web-2", "db-1", "web-lb"]);
  });

  it("does not appear for a role with one member", () => {
    const plan = planAdd(env(), [member("web-1", "web"), member("db-1", "db")]);
    expect(plan.members.some((m) => m.kind === "balancer")).toBe(false);
  });

  it("runs after every member of its role, whatever their priorities", () => {
    const plan = planAdd(env(), [
      member("web-1", "web", { priority: 5 }),
      member("web-2", "web", { priority: 3 }),
      member("db-1", "db", { priority: 1 }),
    ]);
    expect(ids(plan.members)).toEqual(["db-1", "web-2", "web-1", "web-lb"]);
    expect(plan.members.at(-1)?.priority).toBe(6);
    expect(plan.members.at(-1)?.outputs.upstreams).toBe("web-2,web-1");
  });

  it("follows the role as members are added to an existing environment", () => {
    const first = planAdd(env(), [member("web-1", "web"), member("web-2", "web")]);
    const plan = planAdd(env(first.members), [member("web-3", "web")]);
    expect(ids(plan.added)).toEqual(["web-3"]);
    expect(plan.changed).toEqual(["web-lb"]);
    expect(plan.members.find((m) => m.id === "web-lb")?.outputs.upstreams).toBe("web-1,web-2,web-3");
  });

  it("follows the role as members leave, and goes when the role drops to one member", () => {
    const three = planAdd(env(), [
      member("web-1", "web"),
      member("web-2", "web"),
      member("web-3", "web"),
    ]).members;
    const two = planRemove(env(three), ["web-2"]);
    expect(ids(two.removed)).toEqual(["web-2"]);
    expect(two.changed).toEqual(["web-lb"]);
    expect(two.members.find((m) => m.id === "web-lb")?.outputs.upstreams).toBe("web-1,web-3");

    const one = planRemove(env(two.members), ["web-3"]);
    expect(ids(one.removed).sort()).toEqual(["web-3", "web-lb"]);
    expect(ids(one.members)).toEqual(["web-1"]);
    expect(one.changed).toEqual([]);
  });

  it("leaves other roles alone", () => {
    const start = planAdd(env(), [
      member("web-1", "web"),
      member("web-2", "web"),
      member("db-1", "db"),
    ]).members;
    const plan = planAdd(env(start), [member("db-2", "db")]);
    expect(ids(plan.added)).toEqual(["db-2", "db-lb"]);
    expect(plan.changed).toEqual([]);
    expect(plan.members.find((m) => m.id === "web-lb")?.outputs.upstreams).toBe("web-1,web-2");
    expect(plan.members.find((m) => m.id === "db-lb")?.outputs.upstreams).toBe("db-1,db-2");
  });

  it("drops a lost member from its upstreams and takes it back when it is up", () => {
    const ms = planAdd(env(), [member("web-1", "web"), member("web-2", "web")]).members;
    const lost = ms.map((m) => (m.id === "web-1" ? { ...m, state: "LOST" as const } : m));
    const down = planEvent(env(lost), "isDown", "web-1");
    expect(down.changed).toEqual(["web-lb"]);
    expect(down.members.find((m) => m.id === "web-lb")?.outputs.upstreams).toBe("web-2");
    const back = planEvent(
      env(down.members.map((m) => ({ ...m, state: "RUNNING" as const }))),
      "isUp",
      "web-1",
    );
    expect(back.members.find((m) => m.id === "web-lb")?.outputs.upstreams).toBe("web-1,web-2");
  });

  it("repairs drifted upstreams when the coordinator starts", () => {
    const ms = planAdd(env(), [member("web-1", "web"), member("web-2", "web")]).members.map((m) =>
      m.kind === "balancer" ? { ...m, outputs: { ...m.outputs, upstreams: "stale" } } : m,
    );
    const plan = planEvent(env(ms), "coordinatorStart");
    expect(plan.changed).toEqual(["web-lb"]);
    expect(plan.members.find((m) => m.id === "web-lb")?.outputs.upstreams).toBe("web-1,web-2");
  });

  it("gets another id when <role>-lb is taken", () => {
    const plan = planAdd(env([member("web-lb", "other")]), [member("web-1", "web"), member("web-2", "web")]);
    expect(plan.members.find((m) => m.kind === "balancer")?.id).toBe("web-lb-2");
  });
});

describe("hook engine", () => {
  it("runs hooks in priority order over one snapshot and applies their plan", () => {
    const calls: string[] = [];
    const spy: MemberKind = {
      name: "spy",
      beforeOtherIsAdded: (_e, self, other) => {
        calls.push(`${self.id}:before:${other.id}`);
        return [];
      },
      afterOtherIsAdded: (e, self, other) => {
        calls.push(`${self.id}:after:${other.id}:${e.members.length}`);
        return [{ type: "set", memberId: self.id, outputs: { last: other.id } }];
      },
    };
    const kinds = new Map([
      ["vm", { name: "vm" }],
      ["spy", spy],
    ]);
    const base = [
      member("b", "x", { kind: "spy", priority: 2 }),
      member("a", "x", { kind: "spy", priority: 1 }),
    ];
    const plan = planAdd(env(base), [member("new", "y")], kinds);
    expect(calls).toEqual(["a:before:new", "b:before:new", "a:after:new:3", "b:after:new:3"]);
    expect(plan.changed).toEqual(["a", "b"]);
    expect(plan.members.find((m) => m.id === "a")?.outputs).toEqual({ last: "new" });
  });

  it("does not change the snapshot it was given", () => {
    const ms = planAdd(env(), [member("web-1", "web")]).members;
    const snap = env(ms);
    const copy = structuredClone(snap);
    planAdd(snap, [member("web-2", "web")]);
    expect(snap).toEqual(copy);
  });

  it("lets a hook refuse an event", () => {
    const guard: MemberKind = {
      name: "guard",
      beforeOtherIsAdded: () => {
        throw new VmenvError("failed-precondition", "no more members", { reason: "GUARDED" });
      },
    };
    const kinds = new Map([
      ["vm", { name: "vm" }],
      ["guard", guard],
    ]);
    expect(() => planAdd(env([member("g", "", { kind: "guard" })]), [member("x", "")], kinds)).toThrow(
      /no more members/,
    );
  });

  it("stops hooks that keep adding members", () => {
    let n = 0;
    const breeder: MemberKind = {
      name: "breeder",
      afterItIsAdded: () => [{ type: "add", member: member(`b${++n}`, "", { kind: "breeder" }) }],
    };
    const kinds = new Map([["breeder", breeder]]);
    expect(() => planAdd(env(), [member("b0", "", { kind: "breeder" })], kinds)).toThrow(
      expect.objectContaining({ reason: "HOOK_LOOP" }),
    );
  });

  it("refuses an unknown kind and a duplicate member", () => {
    expect(() => planAdd(env(), [member("x", "", { kind: "nope" })])).toThrow(
      expect.objectContaining({ reason: "UNKNOWN_MEMBER_KIND" }),
    );
    expect(() => planAdd(env([member("x", "")]), [member("x", "")])).toThrow(
      expect.objectContaining({ reason: "MEMBER_EXISTS" }),
    );
  });
});
