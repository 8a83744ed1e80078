/**
 * The environment operation kinds run by the operation engine (ops/engine.ts): environment.create,
 * .delete, .add_member, .remove_member, .start, .stop, .suspend, .resume. Each takes the environment's
 * lock. Steps are idempotent (they measure the agent first) and write their store changes with their
 * completion (`ctx.onComplete`), so a crash anywhere leaves a state the resumed step recognises.
 * Steps are planned from `op.input` and `op.data` (what earlier steps saved), never from the live
 * environment record, so the ids of planned steps stay stable. See docs/adr/0011-environments.md.
 */
import { VmState } from "@vmenv/api/agent/v1";
import type { Logger } from "@vmenv/rpc";
import { alreadyExists, failedPrecondition, notFound, VmenvError } from "@vmenv/rpc/errors";
import { type Usage, usageToStore } from "../domain/usage.js";
import type { AgentView } from "../fleet/fleet.js";
import type { OperationKind, OpRecord, StepContext, StepDef } from "../ops/types.js";
import { type AffinityRuleSpec, type PlacementRequest, placeAll } from "../placement/place.js";
import type { AgentClients, Clock } from "../ports.js";
import { keys } from "../store/keys.js";
import type { JsonValue, Store, StoreReader, Txn } from "../store/store.js";
import type { EffectivePolicy } from "../tree/domain.js";
import { assignAddresses, nicsOf, releaseAddresses } from "./addresses.js";
import {
  type AgentTarget,
  deleteVm,
  deleteVolume,
  ensureVm,
  ensureVolume,
  pauseVm,
  resumeVm,
  startVm,
  stopVm,
  syncOutputs,
} from "./agent.js";
import { envResult } from "./convert.js";
import { builtinKinds, type EnvSnapshot, type KindRegistry, planAdd, planRemove } from "./kinds.js";
import {
  byPriority,
  type EnvRecord,
  type EnvStateName,
  envUsage,
  type MemberRecord,
  type MemberStateName,
  memberUsage,
} from "./model.js";

/** What the environment code needs from the rest of the coordinator. */
export interface EnvDeps {
  store: Store;
  tree: {
    charge(tx: Txn, path: string, delta: Usage): Promise<void>;
    release(tx: Txn, path: string, delta: Usage): Promise<void>;
    effectivePolicy(reader: StoreReader, path: string): Promise<EffectivePolicy>;
  };
  fleet: {
    views(): AgentView[];
    clients(id: string): AgentClients;
    charge(tx: Txn, agentId: string, delta: Usage): Promise<void>;
    release(tx: Txn, agentId: string, delta: Usage): Promise<void>;
  };
  clock: Clock;
  logger: Logger;
  /** How long a reservation (claim) holds room before the collector may release it. */
  reservationTtlMs: number;
  kinds?: KindRegistry;
}

/** A reservation as stored at `claim/{op}.{member}`. */
export interface ClaimRecord {
  [k: string]: JsonValue | undefined;
  op: string;
  env: string;
  member: string;
  agent: string;
  node: string;
  usage: ReturnType<typeof usageToStore>;
  deadlineMs: number;
}

export const claimKey = (op: string, member: string) => keys.claim(`${op}.${member}`);

// ---- inputs --------------------------------------------------------------------------------------

export interface CreateInput {
  [k: string]: JsonValue | undefined;
  env: string;
  node: string;
  description: string;
  labels: Record<string, string>;
  members: MemberRecord[];
  start: boolean;
  fingerprint: string;
}
export interface DeleteInput {
  [k: string]: JsonValue | undefined;
  env: string;
  force: boolean;
}
export interface AddMemberInput {
  [k: string]: JsonValue | undefined;
  env: string;
  member: MemberRecord;
}
export interface RemoveMemberInput {
  [k: string]: JsonValue | undefined;
  env: string;
  member: string;
  force: boolean;
}
export interface MembersInput {
  [k: string]: JsonValue | undefined;
  env: string;
  /** Member ids; empty: every member. */
  members: string[];
  force?: boolean;
  gracefulMs?: number;
}

// ---- store helpers -------------------------------------------------------------------------------

export async function readEnv(r: StoreReader, id: string): Promise<EnvRecord | undefined> {
  return r.get<EnvRecord>(keys.env(id));
}

/** Reads environment `id` in `tx`, changes it with `fn`, stamps and writes it; undefined when gone. */
export async function mutateEnv(
  deps: EnvDeps,
  tx: Txn,
  id: string,
  fn: (e: EnvRecord) => void,
): Promise<EnvRecord | undefined> {
  const e = await readEnv(tx, id);
  if (!e) return undefined;
  fn(e);
  e.updateMs = deps.clock.now();
  tx.put(keys.env(id), e);
  return e;
}

function setMember(e: EnvRecord, id: string, patch: Partial<MemberRecord>): void {
  const m = e.members.find((x) => x.id === id);
  if (m) Object.assign(m, patch);
}

/** Deletes every claim of `env`'s member `member` (of any operation). */
async function dropClaims(tx: Txn, env: string, member?: string): Promise<void> {
  for (const [k, c] of await tx.list<ClaimRecord>(keys.claimPrefix)) {
    if (c.env === env && (member === undefined || c.member === member)) tx.del(k);
  }
}

/**
 * Gives back what member `id` of `e` counts (tree and agent) and the addresses it holds on shared
 * networks, drops its claims and removes it from the record, in `tx`. A member no longer in the record
 * was released already: nothing happens.
 */
async function releaseMember(deps: EnvDeps, tx: Txn, e: EnvRecord, id: string): Promise<void> {
  const m = e.members.find((x) => x.id === id);
  if (!m) return;
  const u = memberUsage(m);
  await deps.tree.release(tx, e.node, u);
  if (m.agent) await deps.fleet.release(tx, m.agent, u);
  await releaseAddresses(tx, e.id, m);
  await dropClaims(tx, e.id, id);
  e.members = e.members.filter((x) => x.id !== id);
}

function snapshot(e: Pick<EnvRecord, "id" | "node" | "labels" | "members">): EnvSnapshot {
  return { id: e.id, node: e.node, labels: e.labels, members: e.members };
}

function envNotFound(id: string): VmenvError {
  return notFound("environment", `environments/${id}`);
}

// ---- agents --------------------------------------------------------------------------------------

/** One agent as the shared agent helpers (agent.ts) see it, for a step. */
export function target(deps: EnvDeps, ctx: StepContext, agent: string): AgentTarget {
  return {
    id: agent,
    clients: deps.fleet.clients(agent),
    record: (operation) => ctx.recordAgentOperation(`agents/${agent}`, operation),
    signal: ctx.signal,
  };
}

/** A request id for one agent call of a step: the step's, plus what the call is. */
export const rid = (ctx: StepContext, what: string) => `${ctx.requestId}:${what}`.slice(0, 128);

/** Stops (unless `force`), then deletes a member's VM and volumes on its agent. Idempotent. */
async function teardown(
  deps: EnvDeps,
  ctx: StepContext,
  env: string,
  m: Pick<MemberRecord, "id" | "agent" | "volumes">,
  opts: { force: boolean; tag: string },
): Promise<void> {
  if (!m.agent) return;
  const a = target(deps, ctx, m.agent);
  if (!opts.force) await stopVm(a, env, m.id, rid(ctx, `${opts.tag}stop`), { gracefulMs: 10_000 });
  await deleteVm(a, env, m.id, rid(ctx, `${opts.tag}delvm`));
  for (const v of m.volumes) await deleteVolume(a, env, m.id, v.id, rid(ctx, `${opts.tag}delvol-${v.id}`));
}

// ---- placement -----------------------------------------------------------------------------------

interface PlacementJson {
  agent?: string;
  agentLabels?: Record<string, string>;
  affinityRules?: Array<{
    type?: string;
    enforcement?: string;
    memberIds?: string[];
    roles?: string[];
    weight?: number;
  }>;
}

function networksOf(m: MemberRecord): string[] {
  return nicsOf(m)
    .map((n) => n.network ?? "")
    .filter(Boolean);
}

export function placementRequest(
  m: MemberRecord,
  policy: EffectivePolicy,
  peers: MemberRecord[],
): PlacementRequest {
  const p = (m.placement ?? {}) as PlacementJson;
  const rules: AffinityRuleSpec[] = (p.affinityRules ?? []).map((r) => ({
    type: r.type === "AFFINITY_TYPE_AFFINITY" ? "affinity" : "anti-affinity",
    enforcement: r.enforcement === "AFFINITY_ENFORCEMENT_SOFT" ? "soft" : "hard",
    memberIds: r.memberIds ?? [],
    roles: r.roles ?? [],
    weight: r.weight ?? 0,
  }));
  const nets = networksOf(m);
  if (policy.allowedNetworks) {
    const bad = nets.find((n) => !policy.allowedNetworks?.includes(n));
    if (bad)
      throw failedPrecondition(
        `member ${m.id} joins ${bad}, which the node's policy does not allow (allowed: ${policy.allowedNetworks.join(", ") || "none"})`,
        "NETWORK_NOT_ALLOWED",
        { member: m.id, network: bad },
      );
  }
  return {
    memberId: m.id,
    role: m.role,
    need: memberUsage(m),
    ...(p.agent ? { agent: p.agent.replace(/^agents\//, "") } : {}),
    agentLabels: p.agentLabels ?? {},
    requiredLabels: policy.allowedHostLabels,
    networks: nets,
    rules,
    peers: peers.filter((x) => x.agent).map((x) => ({ memberId: x.id, role: x.role, agent: x.agent })),
    strategy: "binpack",
  };
}

/**
 * Places `members` (in priority order) among the fleet, next to the already placed `peers`; returns
 * them with their agent set. Throws placement's NO_AGENT_FITS (or NETWORK_NOT_ALLOWED).
 */
export async function placeMembers(
  deps: EnvDeps,
  node: string,
  members: MemberRecord[],
  peers: MemberRecord[],
): Promise<MemberRecord[]> {
  const policy = await deps.tree.effectivePolicy(deps.store, node);
  const ordered = byPriority(members);
  const choices = placeAll(
    ordered.map((m) => placementRequest(m, policy, peers)),
    deps.fleet.views(),
  );
  return ordered.map((m, i) => ({ ...m, agent: choices[i]?.agent ?? "" }));
}

/** Charges the tree and the agents for `members`, with a claim for each, in `tx`. */
async function claim(
  deps: EnvDeps,
  tx: Txn,
  op: OpRecord,
  env: string,
  node: string,
  members: MemberRecord[],
) {
  await deps.tree.charge(tx, node, envUsage(members));
  const deadlineMs = deps.clock.now() + deps.reservationTtlMs;
  for (const m of members) {
    const u = memberUsage(m);
    await deps.fleet.charge(tx, m.agent, u);
    const c: ClaimRecord = {
      op: op.id,
      env,
      member: m.id,
      agent: m.agent,
      node,
      usage: usageToStore(u),
      deadlineMs,
    };
    tx.put(claimKey(op.id, m.id), c);
  }
}

// ---- steps shared by create and add_member ---------------------------------------------------------

/** Per new member: its volumes, its VM (confirming its claim), then the outputs on VM labels, then starts. */
function buildSteps(deps: EnvDeps, env: string, members: MemberRecord[], start: boolean): StepDef[] {
  const steps: StepDef[] = [];
  for (const m of members) {
    if (m.volumes.length > 0)
      steps.push({
        id: `volumes.${m.id}`,
        description: `create the volumes of ${m.id} on agents/${m.agent}`,
        agent: `agents/${m.agent}`,
        async run(ctx) {
          const a = target(deps, ctx, m.agent);
          for (const v of m.volumes) await ensureVolume(a, env, m.id, v, rid(ctx, `vol-${v.id}`));
        },
        async undo(ctx) {
          const a = target(deps, ctx, m.agent);
          for (const v of m.volumes) await deleteVolume(a, env, m.id, v.id, rid(ctx, `undo-vol-${v.id}`));
        },
      });
    steps.push({
      id: `vm.${m.id}`,
      description: `create the VM of ${m.id} on agents/${m.agent}`,
      agent: `agents/${m.agent}`,
      async run(ctx) {
        const cur = (await readEnv(deps.store, env))?.members.find((x) => x.id === m.id) ?? m;
        const vm = await ensureVm(target(deps, ctx, m.agent), env, cur, rid(ctx, "vm"));
        const vmId = vm.name.replace(/^vms\//, "");
        ctx.onComplete(async (tx) => {
          await mutateEnv(deps, tx, env, (e) => setMember(e, m.id, { state: "STOPPED", vm: vmId }));
          // The reservation is confirmed: the room stays counted (alloc/, usage/), the claim goes.
          tx.del(claimKey(ctx.op.id, m.id));
        });
      },
      async undo(ctx) {
        await deleteVm(target(deps, ctx, m.agent), env, m.id, rid(ctx, "undo-vm"));
      },
    });
  }
  if (members.length > 0)
    steps.push({
      id: "outputs",
      description: "set the members' outputs on their VMs' labels",
      async run(ctx) {
        await syncAllOutputs(deps, ctx, env);
      },
    });
  if (start)
    for (const m of members)
      steps.push({
        id: `start.${m.id}`,
        description: `start ${m.id}`,
        agent: `agents/${m.agent}`,
        async run(ctx) {
          await startVm(target(deps, ctx, m.agent), env, m.id, rid(ctx, "start"));
          ctx.onComplete(async (tx) => {
            await mutateEnv(deps, tx, env, (e) => setMember(e, m.id, { state: "RUNNING" }));
          });
        },
      });
  return steps;
}

/** Makes every member's VM labels carry its outputs. */
async function syncAllOutputs(deps: EnvDeps, ctx: StepContext, env: string, only?: string[]): Promise<void> {
  const e = await readEnv(deps.store, env);
  for (const m of e?.members ?? []) {
    if (!m.agent || (only && !only.includes(m.id))) continue;
    if (Object.keys(m.outputs).length === 0 && !only) continue;
    await syncOutputs(target(deps, ctx, m.agent), env, m, rid(ctx, `labels-${m.id}`));
  }
}

// ---- environment.create ----------------------------------------------------------------------------

function createKind(deps: EnvDeps): OperationKind {
  const kinds = deps.kinds ?? builtinKinds;
  return {
    kind: "environment.create",
    lock: (op) => (op.input as CreateInput).env,
    cancellable: true,
    plan(op) {
      const inp = op.input as CreateInput;
      const claimStep: StepDef = {
        id: "claim",
        description: "run the kinds' hooks, place the members and reserve their room",
        async run(ctx) {
          const have = await readEnv(deps.store, inp.env);
          if (have) {
            if (have.createOp === op.id) return;
            if (have.fingerprint === inp.fingerprint) {
              await ctx.save({ duplicate: true });
              return;
            }
            throw alreadyExists("environment", `environments/${inp.env}`);
          }
          const plan = planAdd(
            { id: inp.env, node: inp.node, labels: inp.labels, members: [] },
            inp.members,
            kinds,
          );
          const placed = await placeMembers(deps, inp.node, plan.members, []);
          const members = plan.members.map((m) => ({
            ...m,
            agent: placed.find((p) => p.id === m.id)?.agent ?? "",
            state: "CREATING" as MemberStateName,
          }));
          await ctx.save({ members });
          ctx.onComplete(async (tx) => {
            if (await readEnv(tx, inp.env)) throw alreadyExists("environment", `environments/${inp.env}`);
            // Addresses on shared networks are chosen here, where transactions are serialised, and go
            // into the record's specs, which the VM steps (and retries, resumes, moves) give the agents.
            const addressed = await assignAddresses(tx, deps.fleet.views(), inp.env, members);
            await claim(deps, tx, ctx.op, inp.env, inp.node, addressed);
            const now = deps.clock.now();
            const rec: EnvRecord = {
              id: inp.env,
              node: inp.node,
              description: inp.description,
              labels: inp.labels,
              members: addressed,
              transition: "CREATING",
              failed: false,
              stateMessage: "",
              createOp: op.id,
              fingerprint: inp.fingerprint,
              createMs: now,
              updateMs: now,
            };
            tx.put(keys.env(inp.env), rec);
          });
        },
        async undo(ctx) {
          await undoCreate(deps, ctx, inp.env);
        },
      };
      if (op.data.duplicate) return [claimStep];
      const members = (op.data.members ?? []) as MemberRecord[];
      return [claimStep, ...buildSteps(deps, inp.env, members, inp.start)];
    },
    async result(op, tx) {
      const inp = op.input as CreateInput;
      const e = await mutateEnv(deps, tx, inp.env, (x) => {
        if (x.createOp === op.id) x.transition = "";
      });
      return e ? envResult(e) : undefined;
    },
    async onFailed(op, tx) {
      const e = await readEnv(tx, (op.input as CreateInput).env);
      if (e && e.createOp === op.id) {
        // The rollback could not remove everything: say so; DeleteEnvironment cleans up.
        e.failed = true;
        e.transition = "";
        e.stateMessage = `creation failed and was not completely undone: ${op.error?.message ?? ""}`;
        tx.put(keys.env(e.id), e);
      }
    },
  };
}

/** Removes everything a create made: VMs and volumes on the agents, then usage, claims and the record. */
async function undoCreate(deps: EnvDeps, ctx: StepContext, env: string): Promise<void> {
  const e = await readEnv(deps.store, env);
  if (!e || e.createOp !== ctx.op.id) return;
  for (const m of [...e.members].reverse()) await teardown(deps, ctx, env, m, { force: true, tag: "undo-" });
  await deps.store.transact(async (tx) => {
    const cur = await readEnv(tx, env);
    if (!cur || cur.createOp !== ctx.op.id) return;
    for (const m of [...cur.members]) await releaseMember(deps, tx, cur, m.id);
    await dropClaims(tx, env);
    tx.del(keys.env(env));
  });
}

// ---- environment.delete ----------------------------------------------------------------------------

function deleteKind(deps: EnvDeps): OperationKind {
  return {
    kind: "environment.delete",
    lock: (op) => (op.input as DeleteInput).env,
    cancellable: false,
    plan(op) {
      const inp = op.input as DeleteInput;
      const steps: StepDef[] = [
        {
          id: "prepare",
          description: "mark the environment DELETING",
          async run(ctx) {
            const e = await readEnv(deps.store, inp.env);
            if (!e) {
              await ctx.save({ members: [] });
              return;
            }
            const members = byPriority(e.members).reverse();
            await ctx.save({
              members: members.map((m) => ({ id: m.id, agent: m.agent, volumes: m.volumes })),
            });
            ctx.onComplete(async (tx) => {
              await mutateEnv(deps, tx, inp.env, (x) => {
                x.transition = "DELETING";
                x.failed = false;
              });
            });
          },
        },
      ];
      const members = (op.data.members ?? []) as MemberRecord[];
      for (const m of members) steps.push(teardownStep(deps, inp.env, m, inp.force));
      if (op.data.members !== undefined)
        steps.push({
          id: "remove",
          description: "remove the environment's record",
          async run(ctx) {
            ctx.onComplete(async (tx) => {
              const e = await readEnv(tx, inp.env);
              if (!e) return;
              for (const m of [...e.members]) await releaseMember(deps, tx, e, m.id);
              await dropClaims(tx, inp.env);
              tx.del(keys.env(inp.env));
            });
          },
        });
      return steps;
    },
  };
}

/** Destroys a member's VM and volumes, then releases what it counted and removes it from the record. */
function teardownStep(
  deps: EnvDeps,
  env: string,
  m: Pick<MemberRecord, "id" | "agent" | "volumes">,
  force: boolean,
): StepDef {
  return {
    id: `destroy.${m.id}`,
    description: `destroy the VM and volumes of ${m.id}${m.agent ? ` on agents/${m.agent}` : ""}`,
    ...(m.agent ? { agent: `agents/${m.agent}` } : {}),
    async run(ctx) {
      await teardown(deps, ctx, env, m, { force, tag: "" });
      ctx.onComplete(async (tx) => {
        const e = await readEnv(tx, env);
        if (!e) return;
        await releaseMember(deps, tx, e, m.id);
        e.updateMs = deps.clock.now();
        tx.put(keys.env(env), e);
      });
    },
  };
}

// ---- environment.add_member / remove_member ---------------------------------------------------------

function addMemberKind(deps: EnvDeps): OperationKind {
  const kinds = deps.kinds ?? builtinKinds;
  return {
    kind: "environment.add_member",
    lock: (op) => (op.input as AddMemberInput).env,
    cancellable: true,
    plan(op) {
      const inp = op.input as AddMemberInput;
      const claimStep: StepDef = {
        id: "claim",
        description: `run the kinds' hooks for ${inp.member.id}, place the new members and reserve their room`,
        async run(ctx) {
          const e = await readEnv(deps.store, inp.env);
          if (!e) throw envNotFound(inp.env);
          const plan = planAdd(snapshot(e), [inp.member], kinds);
          const placed = await placeMembers(deps, e.node, plan.added, e.members);
          const added = plan.added.map((m) => ({
            ...m,
            agent: placed.find((p) => p.id === m.id)?.agent ?? "",
            state: "CREATING" as MemberStateName,
          }));
          const outputs = Object.fromEntries(plan.members.map((m) => [m.id, m.outputs]));
          const before = Object.fromEntries(e.members.map((m) => [m.id, m.outputs]));
          const running = e.members.length > 0 && e.members.every((m) => m.state === "RUNNING");
          await ctx.save({ added, outputs, before, start: running, changed: plan.changed });
          ctx.onComplete(async (tx) => {
            const cur = await readEnv(tx, inp.env);
            if (!cur) throw envNotFound(inp.env);
            const addressed = await assignAddresses(tx, deps.fleet.views(), inp.env, added);
            await claim(deps, tx, ctx.op, inp.env, cur.node, addressed);
            const order = plan.members.map((m) => m.id);
            cur.members = [...cur.members, ...addressed]
              .map((m) => ({ ...m, outputs: outputs[m.id] ?? m.outputs }))
              .sort((a, b) => order.indexOf(a.id) - order.indexOf(b.id));
            cur.updateMs = deps.clock.now();
            tx.put(keys.env(inp.env), cur);
          });
        },
        async undo(ctx) {
          const added = (ctx.op.data.added ?? []) as MemberRecord[];
          const before = (ctx.op.data.before ?? {}) as Record<string, Record<string, string>>;
          for (const m of added) await teardown(deps, ctx, inp.env, m, { force: true, tag: "undo-" });
          await deps.store.transact(async (tx) => {
            const e = await readEnv(tx, inp.env);
            if (!e) return;
            for (const m of added) await releaseMember(deps, tx, e, m.id);
            for (const m of e.members) if (before[m.id]) m.outputs = before[m.id] as Record<string, string>;
            e.updateMs = deps.clock.now();
            tx.put(keys.env(inp.env), e);
          });
          // The other members' VMs get their previous outputs back.
          await syncAllOutputs(deps, ctx, inp.env, (ctx.op.data.changed ?? []) as string[]);
        },
      };
      const added = (op.data.added ?? []) as MemberRecord[];
      return [claimStep, ...buildSteps(deps, inp.env, added, op.data.start === true)];
    },
    result: async (op, tx) => {
      const e = await readEnv(tx, (op.input as AddMemberInput).env);
      return e ? envResult(e) : undefined;
    },
  };
}

function removeMemberKind(deps: EnvDeps): OperationKind {
  const kinds = deps.kinds ?? builtinKinds;
  return {
    kind: "environment.remove_member",
    lock: (op) => (op.input as RemoveMemberInput).env,
    cancellable: false,
    plan(op) {
      const inp = op.input as RemoveMemberInput;
      const steps: StepDef[] = [
        {
          id: "prepare",
          description: `run the kinds' hooks for removing ${inp.member}`,
          async run(ctx) {
            const e = await readEnv(deps.store, inp.env);
            if (!e) throw envNotFound(inp.env);
            if (!e.members.some((m) => m.id === inp.member))
              throw new VmenvError("not-found", `member ${inp.member} not found in environments/${inp.env}`, {
                reason: "MEMBER_NOT_FOUND",
                metadata: { environment: `environments/${inp.env}`, member: inp.member },
              });
            const plan = planRemove(snapshot(e), [inp.member], kinds);
            const removed = byPriority(plan.removed).reverse();
            await ctx.save({
              removed: removed.map((m) => ({ id: m.id, agent: m.agent, volumes: m.volumes })),
              changed: plan.changed,
            });
            ctx.onComplete(async (tx) => {
              await mutateEnv(deps, tx, inp.env, (x) => {
                for (const m of x.members) {
                  if (removed.some((r) => r.id === m.id)) m.state = "DELETING";
                  const now = plan.members.find((p) => p.id === m.id);
                  if (now) m.outputs = now.outputs;
                }
              });
            });
          },
        },
      ];
      if (op.data.removed === undefined) return steps;
      steps.push({
        id: "outputs",
        description: "set the remaining members' outputs on their VMs' labels",
        async run(ctx) {
          await syncAllOutputs(deps, ctx, inp.env, (ctx.op.data.changed ?? []) as string[]);
        },
      });
      for (const m of op.data.removed as MemberRecord[])
        steps.push(teardownStep(deps, inp.env, m, inp.force));
      return steps;
    },
    result: async (op, tx) => {
      const e = await readEnv(tx, (op.input as RemoveMemberInput).env);
      return e ? envResult(e) : undefined;
    },
  };
}

// ---- start / stop / suspend / resume ---------------------------------------------------------------

interface MembersVerb {
  kind: string;
  verb: string;
  transition: EnvStateName;
  reverse: boolean;
  act(a: AgentTarget, env: string, member: string, requestId: string, inp: MembersInput): Promise<unknown>;
  /** The member's state after `act`; undefined: from the VM. */
  after(vmState: string | undefined): MemberStateName | undefined;
}

function vmStateToMember(s: string | undefined): MemberStateName | undefined {
  switch (s) {
    case "RUNNING":
      return "RUNNING";
    case "PAUSED":
      return "PAUSED";
    case "STOPPED":
    case "CRASHED":
      return "STOPPED";
    default:
      return undefined;
  }
}

function membersKind(deps: EnvDeps, v: MembersVerb): OperationKind {
  return {
    kind: v.kind,
    lock: (op) => (op.input as MembersInput).env,
    cancellable: true,
    plan(op) {
      const inp = op.input as MembersInput;
      const steps: StepDef[] = [
        {
          id: "select",
          description: `choose the members to ${v.verb}`,
          async run(ctx) {
            const e = await readEnv(deps.store, inp.env);
            if (!e) throw envNotFound(inp.env);
            for (const id of inp.members)
              if (!e.members.some((m) => m.id === id))
                throw new VmenvError("not-found", `member ${id} not found in environments/${inp.env}`, {
                  reason: "MEMBER_NOT_FOUND",
                  metadata: { environment: `environments/${inp.env}`, member: id },
                });
            let ms = byPriority(e.members).filter(
              (m) => inp.members.length === 0 || inp.members.includes(m.id),
            );
            if (v.reverse) ms = ms.reverse();
            await ctx.save({ members: ms.map((m) => ({ id: m.id, agent: m.agent })) });
            ctx.onComplete(async (tx) => {
              await mutateEnv(deps, tx, inp.env, (x) => {
                x.transition = v.transition;
              });
            });
          },
        },
      ];
      for (const m of (op.data.members ?? []) as Array<{ id: string; agent: string }>)
        steps.push({
          id: `${v.verb}.${m.id}`,
          description: `${v.verb} ${m.id}`,
          agent: `agents/${m.agent}`,
          async run(ctx) {
            const vm = (await v.act(target(deps, ctx, m.agent), inp.env, m.id, rid(ctx, v.verb), inp)) as
              | { state?: number }
              | undefined;
            const state = v.after(vm?.state !== undefined ? VmState[vm.state] : undefined);
            ctx.onComplete(async (tx) => {
              await mutateEnv(deps, tx, inp.env, (x) => {
                if (state) setMember(x, m.id, { state, stateMessage: "" });
              });
            });
          },
        });
      return steps;
    },
    async result(op, tx) {
      const e = await mutateEnv(deps, tx, (op.input as MembersInput).env, (x) => {
        x.transition = "";
      });
      return e ? envResult(e) : undefined;
    },
    async onFailed(op, tx) {
      await mutateEnv(deps, tx, (op.input as MembersInput).env, (x) => {
        x.transition = "";
      });
    },
  };
}

/** Every environment operation kind, for `engine.register`. */
export function environmentKinds(deps: EnvDeps): OperationKind[] {
  return [
    createKind(deps),
    deleteKind(deps),
    addMemberKind(deps),
    removeMemberKind(deps),
    membersKind(deps, {
      kind: "environment.start",
      verb: "start",
      transition: "STARTING",
      reverse: false,
      act: (a, env, m, r) => startVm(a, env, m, r),
      after: vmStateToMember,
    }),
    membersKind(deps, {
      kind: "environment.stop",
      verb: "stop",
      transition: "STOPPING",
      reverse: true,
      act: (a, env, m, r, inp) =>
        stopVm(a, env, m, r, {
          force: inp.force ?? false,
          ...(inp.gracefulMs ? { gracefulMs: inp.gracefulMs } : {}),
        }),
      after: vmStateToMember,
    }),
    membersKind(deps, {
      kind: "environment.suspend",
      verb: "suspend",
      transition: "SUSPENDED",
      reverse: true,
      act: (a, env, m, r) => pauseVm(a, env, m, r),
      after: vmStateToMember,
    }),
    membersKind(deps, {
      kind: "environment.resume",
      verb: "resume",
      transition: "STARTING",
      reverse: false,
      act: (a, env, m, r) => resumeVm(a, env, m, r),
      after: vmStateToMember,
    }),
  ];
}
