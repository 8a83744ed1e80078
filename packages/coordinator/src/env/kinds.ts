/**
 * Member kinds and their hooks (seed 001), and the engine that runs them (seed 003).
 *
 * A kind reacts to the events of its environment — a member being added or removed (itself or another),
 * a member going down or coming up, the coordinator starting or stopping — by returning **planned
 * actions** (add a member, remove a member, set a member's kind-specific outputs); it never acts. The
 * engine runs the hooks in member priority order over an in-memory copy of one snapshot of the
 * environment, applies each batch of actions to that copy (an added member's own hooks run too), and
 * returns the resulting plan: the members as they should be, which were added, removed or changed. The
 * operation that asked applies the plan as one step (one store transaction, then the agents). A hook
 * refuses an event by throwing a VmenvError.
 *
 * Built-in kinds: `vm` (a plain VM; when a role gets its second member it asks for a balancer) and
 * `balancer` (keeps its `upstreams` output equal to the members of the role it balances, and removes
 * itself when that role drops to one member).
 */
import { failedPrecondition, invalidArgument, type VmenvError } from "@vmenv/rpc/errors";
import type { JsonValue } from "../store/store.js";
import { byPriority, MEMBER_ID, type MemberRecord } from "./model.js";

/** The environment as hooks see it: members in priority order. Read-only. */
export interface EnvSnapshot {
  readonly id: string;
  readonly node: string;
  readonly labels: Readonly<Record<string, string>>;
  readonly members: ReadonlyArray<Readonly<MemberRecord>>;
}

/** What a hook asks for. */
export type PlannedAction =
  | { type: "add"; member: MemberRecord }
  | { type: "remove"; memberId: string }
  | { type: "set"; memberId: string; outputs: Record<string, string> };

type Hook = (env: EnvSnapshot, self: Readonly<MemberRecord>) => PlannedAction[];
type OtherHook = (
  env: EnvSnapshot,
  self: Readonly<MemberRecord>,
  other: Readonly<MemberRecord>,
) => PlannedAction[];

/** A member kind: the hooks the coordinator runs for members of this kind. Every hook is optional. */
export interface MemberKind {
  readonly name: string;
  /** Before the member joins the environment (it is not in `env` yet). */
  beforeItIsAdded?: Hook;
  /** After it joined. */
  afterItIsAdded?: Hook;
  /** Before `other` joins (`other` is not in `env` yet). */
  beforeOtherIsAdded?: OtherHook;
  afterOtherIsAdded?: OtherHook;
  /** Before `other` leaves (still in `env`). */
  beforeOtherIsRemoved?: OtherHook;
  /** After `other` left (no longer in `env`). */
  afterOtherIsRemoved?: OtherHook;
  /** `other` (possibly the member itself) went down: its agent is DOWN; it is LOST in `env`. */
  isDown?: OtherHook;
  /** `other` (possibly the member itself) is up again. */
  isUp?: OtherHook;
  /** The coordinator started (reconcile outputs that may have drifted). */
  coordinatorStart?: Hook;
  /** The coordinator is stopping. */
  coordinatorStop?: Hook;
}

/** The outcome of running hooks over one snapshot. */
export interface Plan {
  /** The members as they should be, in priority order. */
  members: MemberRecord[];
  /** Members that were not there before (the requested ones and those hooks added). */
  added: MemberRecord[];
  /** Members that were there before and are gone. */
  removed: MemberRecord[];
  /** Ids of members that were there before, stay, and whose outputs changed. */
  changed: string[];
}

export type KindRegistry = ReadonlyMap<string, MemberKind>;

/** Most nested additions/removals a plan may trigger (a guard against hooks feeding each other). */
const MAX_DEPTH = 8;

const ROLE_BALANCED = "balances";
const UPSTREAMS = "upstreams";

/** Members of `role` that a balancer sends traffic to (balancers excluded). */
function roleMembers(env: EnvSnapshot, role: string): Readonly<MemberRecord>[] {
  return env.members.filter((m) => m.role === role && m.kind !== "balancer");
}

/** The role a balancer balances: its `balances` output, else its role without a trailing "-lb". */
export function balancedRole(m: Readonly<MemberRecord>): string {
  return m.outputs[ROLE_BALANCED] ?? m.role.replace(/-lb$/, "");
}

const set = (m: Readonly<MemberRecord>, outputs: Record<string, string>): PlannedAction[] => [
  { type: "set", memberId: m.id, outputs },
];

/** A plain VM. When its role gets its second member and nothing balances that role, it asks for one. */
export const vmKind: MemberKind = {
  name: "vm",
  beforeItIsAdded(env, self) {
    if (!self.role) return [];
    const peers = roleMembers(env, self.role);
    if (peers.length < 1) return [];
    if (env.members.some((m) => m.kind === "balancer" && balancedRole(m) === self.role)) return [];
    const first = peers[0] as Readonly<MemberRecord>;
    return [
      {
        type: "add",
        member: balancerFor(
          env,
          self.role,
          first,
          Math.max(first.priority, self.priority, ...peers.map((p) => p.priority)) + 1,
          self.id,
        ),
      },
    ];
  },
};

/** The balancer member planned for `role`: a small VM derived from the role's first member. */
export function balancerFor(
  env: EnvSnapshot,
  role: string,
  first: Readonly<MemberRecord>,
  priority: number,
  addedBy: string,
): MemberRecord {
  const taken = new Set(env.members.map((m) => m.id));
  taken.add(addedBy);
  let id = `${role}-lb`.slice(0, 32).replace(/-+$/, "");
  for (let n = 2; taken.has(id) || !MEMBER_ID.test(id); n++) id = `${role.slice(0, 24)}-lb-${n}`;
  const spec = { ...((first.spec ?? {}) as Record<string, JsonValue>) };
  spec.vcpus = 1;
  delete spec.maxVcpus;
  delete spec.maxMemoryBytes;
  delete spec.disks;
  delete spec.gpus;
  delete spec.pinning;
  // The same networks, but the balancer's own MACs and addresses (the first member's are its own).
  if (Array.isArray(spec.nics))
    spec.nics = spec.nics.map((n) => {
      const { macAddress: _mac, ipAddress: _ip, ...rest } = n as Record<string, JsonValue>;
      return rest;
    });
  return {
    id,
    role: `${role}-lb`,
    kind: "balancer",
    priority,
    spec,
    volumes: [],
    placement: null,
    reschedulePolicy: null,
    state: "PENDING",
    stateMessage: "",
    agent: "",
    vm: "",
    outputs: { [ROLE_BALANCED]: role },
    addedBy,
  };
}

/** The upstreams a balancer should list: members of its role that are not lost or failed, in priority order. */
function upstreams(env: EnvSnapshot, self: Readonly<MemberRecord>): string {
  return roleMembers(env, balancedRole(self))
    .filter((m) => m.state !== "LOST" && m.state !== "FAILED" && m.state !== "DELETING")
    .map((m) => m.id)
    .join(",");
}

const follow: OtherHook = (env, self, other) =>
  other.role === balancedRole(self) ? set(self, { [UPSTREAMS]: upstreams(env, self) }) : [];

/** Sends a role's traffic to its members; its `upstreams` output (and VM label) follows the role. */
export const balancerKind: MemberKind = {
  name: "balancer",
  afterItIsAdded: (env, self) =>
    set(self, { [ROLE_BALANCED]: balancedRole(self), [UPSTREAMS]: upstreams(env, self) }),
  afterOtherIsAdded: follow,
  afterOtherIsRemoved(env, self, other) {
    if (other.role !== balancedRole(self)) return [];
    if (roleMembers(env, balancedRole(self)).length < 2) return [{ type: "remove", memberId: self.id }];
    return set(self, { [UPSTREAMS]: upstreams(env, self) });
  },
  isDown: follow,
  isUp: follow,
  coordinatorStart: (env, self) => set(self, { [UPSTREAMS]: upstreams(env, self) }),
};

/** The kinds the coordinator knows. */
export const builtinKinds: KindRegistry = new Map([
  [vmKind.name, vmKind],
  [balancerKind.name, balancerKind],
]);

// ---- the engine ---------------------------------------------------------------------------------

function clone<T>(x: T): T {
  return structuredClone(x);
}

class Simulation {
  members: MemberRecord[];
  readonly before: Map<string, MemberRecord>;
  constructor(
    private readonly env: EnvSnapshot,
    private readonly kinds: KindRegistry,
  ) {
    this.members = byPriority(env.members.map((m) => clone(m) as MemberRecord));
    this.before = new Map(this.members.map((m) => [m.id, clone(m)]));
  }

  snapshot(): EnvSnapshot {
    return Object.freeze({
      id: this.env.id,
      node: this.env.node,
      labels: this.env.labels,
      members: Object.freeze(this.members.map((m) => Object.freeze(clone(m)))),
    });
  }

  kind(name: string): MemberKind {
    const k = this.kinds.get(name || "vm");
    if (!k) throw invalidArgument("member.kind", `unknown member kind "${name}"`, "UNKNOWN_MEMBER_KIND");
    return k;
  }

  /** Runs `hook` of every member except `skip`, in priority order, collecting their actions. */
  each(
    fn: (k: MemberKind, snap: EnvSnapshot, self: Readonly<MemberRecord>) => PlannedAction[] | undefined,
    skip?: string,
  ) {
    const snap = this.snapshot();
    const out: PlannedAction[] = [];
    for (const self of snap.members) {
      if (self.id === skip) continue;
      out.push(...(fn(this.kind(self.kind), snap, self) ?? []));
    }
    return out;
  }

  apply(actions: PlannedAction[], depth: number): void {
    for (const a of actions) {
      if (a.type === "add") this.add(a.member, depth + 1);
      else if (a.type === "remove") this.remove(a.memberId, depth + 1);
      else {
        const m = this.members.find((x) => x.id === a.memberId);
        if (m) m.outputs = { ...m.outputs, ...a.outputs };
      }
    }
  }

  add(member: MemberRecord, depth: number): void {
    if (depth > MAX_DEPTH) throw loop();
    if (this.members.some((m) => m.id === member.id))
      throw failedPrecondition(
        `member ${member.id} is already in environment ${this.env.id}`,
        "MEMBER_EXISTS",
        {
          environment: `environments/${this.env.id}`,
          member: member.id,
        },
      );
    const m = clone(member);
    const k = this.kind(m.kind);
    const before = [
      ...(k.beforeItIsAdded?.(this.snapshot(), m) ?? []),
      ...this.each((o, snap, self) => o.beforeOtherIsAdded?.(snap, self, m)),
    ];
    this.apply(before, depth);
    this.members = byPriority([...this.members, m]);
    const after = [
      ...(k.afterItIsAdded?.(this.snapshot(), m) ?? []),
      ...this.each((o, snap, self) => o.afterOtherIsAdded?.(snap, self, m), m.id),
    ];
    this.apply(after, depth);
  }

  remove(id: string, depth: number): void {
    if (depth > MAX_DEPTH) throw loop();
    const target = this.members.find((m) => m.id === id);
    if (!target) return;
    this.apply(
      this.each((o, snap, self) => o.beforeOtherIsRemoved?.(snap, self, target), id),
      depth,
    );
    this.members = this.members.filter((m) => m.id !== id);
    this.apply(
      this.each((o, snap, self) => o.afterOtherIsRemoved?.(snap, self, target)),
      depth,
    );
  }

  plan(): Plan {
    const now = new Map(this.members.map((m) => [m.id, m]));
    const same = (a: Record<string, string>, b: Record<string, string>) =>
      JSON.stringify(Object.entries(a).sort()) === JSON.stringify(Object.entries(b).sort());
    return {
      members: this.members,
      added: this.members.filter((m) => !this.before.has(m.id)),
      removed: [...this.before.values()].filter((m) => !now.has(m.id)),
      changed: this.members
        .filter((m) => {
          const b = this.before.get(m.id);
          return b !== undefined && !same(b.outputs, m.outputs);
        })
        .map((m) => m.id),
    };
  }
}

function loop(): VmenvError {
  return failedPrecondition(
    `member hooks keep adding or removing members (more than ${MAX_DEPTH} levels deep)`,
    "HOOK_LOOP",
  );
}

/** Adds `adding` (in priority order) to the environment, running every hook; returns the plan. */
export function planAdd(
  env: EnvSnapshot,
  adding: readonly MemberRecord[],
  kinds: KindRegistry = builtinKinds,
): Plan {
  const sim = new Simulation(env, kinds);
  for (const m of byPriority(adding)) sim.add(m, 0);
  return sim.plan();
}

/** Removes members by id, running every hook; returns the plan. Unknown ids are skipped. */
export function planRemove(
  env: EnvSnapshot,
  ids: readonly string[],
  kinds: KindRegistry = builtinKinds,
): Plan {
  const sim = new Simulation(env, kinds);
  for (const id of ids) sim.remove(id, 0);
  return sim.plan();
}

/**
 * Runs an event's hooks: `isDown`/`isUp` for member `memberId` (already LOST, or back, in `env`), or
 * `coordinatorStart`/`coordinatorStop` for every member; returns the plan.
 */
export function planEvent(
  env: EnvSnapshot,
  event: "isDown" | "isUp" | "coordinatorStart" | "coordinatorStop",
  memberId?: string,
  kinds: KindRegistry = builtinKinds,
): Plan {
  const sim = new Simulation(env, kinds);
  if (event === "isDown" || event === "isUp") {
    const target = sim.members.find((m) => m.id === memberId);
    if (target)
      sim.apply(
        sim.each((k, snap, self) => k[event]?.(snap, self, target)),
        0,
      );
  } else {
    sim.apply(
      sim.each((k, snap, self) => k[event]?.(snap, self)),
      0,
    );
  }
  return sim.plan();
}
