/**
 * The "environment.migrate" operation kind: live migration of environment members between agents,
 * libvirt's v3 protocol with Nova's claims, every phase an idempotent engine step:
 *
 * | step          | where        | does                                                           | undo                               |
 * |---------------|--------------|----------------------------------------------------------------|------------------------------------|
 * | `select`      | —            | checks the members, orders them, marks the environment MIGRATING | —                                |
 * | `claim.M`     | store        | places M on a destination (never its source), charges it, claim record | releases the charge, drops the claim |
 * | `volumes.M`   | destination  | creates M's local volumes there (same ids, sizes, formats)     | deletes them                       |
 * | `wake.M`      | source       | a STOPPED member only: StartVm paused (its guest never runs)    | StopVm (force): stopped again      |
 * | `prepare.M`   | destination  | PrepareVmMigration (incoming VMM; NBD export of the volumes)   | DeleteVm there                     |
 * | `perform.M`   | source       | MigrateVm and its agent operation, progress copied to ours     | cancels it; resumes the source     |
 * | `finish.M`    | destination  | FinishVmMigration: the VM runs (or stays paused) there         | DeleteVm there (it never ran)      |
 * | `confirm.M`   | source+store | DeleteVm (and volumes) on the source; a STOPPED member's VM stopped on the destination; member.agent = destination, source released, claim gone | — |
 *
 * Once `finish.M` has succeeded the member is never rolled back: the destination runs it; every undo of
 * M's steps is then a no-op, and `confirm.M` does not fail (a source it cannot clean is left to the
 * collector, which removes VMs no member owns). Before that, any failure undoes M's steps in reverse:
 * the source runs on, the destination is cleaned, the claim released. Members already moved stay
 * moved. A destination that cannot be reached during a rollback is left to the collector (its incoming
 * VMM never ran the guest), so one dead destination does not make the rollback fail.
 *
 * Order: members by priority, balancers last (the entry point moves after what it balances; the
 * balancer's upstreams list member ids, which a move does not change).
 *
 * Running, paused and stopped members move, and each ends as it was. A paused member's VMM is migrated
 * paused and finished paused. A stopped member has no VMM: `wake` starts one paused on the source (the
 * guest never runs, so its disks do not change), the same steps move it and its disks, and `confirm`
 * stops it on the destination — a cold migration through the live path, with one data path for both.
 * Members in any other state (LOST, FAILED, being created...) fail the operation with
 * FAILED_PRECONDITION `MEMBER_NOT_MOVABLE`.
 */
import { fromJson, type JsonValue as PbJson, toJson } from "@bufbuild/protobuf";
import { type Any, anyPack, anyUnpack, durationFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  OperationState as AgentOpState,
  MigrationSettingsSchema,
  VmMigrationPhase,
  type VmMigrationProgress,
  VmMigrationProgressSchema,
  VmMigrationTargetSchema,
  VmState,
} from "@vmenv/api/agent/v1";
import { failedPrecondition, notFound, VmenvError } from "@vmenv/rpc/errors";
import { type StoredUsage, usageFromStore, usageToStore } from "../domain/usage.js";
import type { OperationKind, OpRecord, StepContext, StepDef } from "../ops/types.js";
import { place } from "../placement/place.js";
import type { JsonValue, Txn } from "../store/store.js";
import {
  type AgentTarget,
  deleteVm,
  deleteVolume,
  ensureVolume,
  getVm,
  isNotFound,
  stopVm,
  waitAgentOp,
} from "./agent.js";
import { envResult } from "./convert.js";
import { byPriority, type EnvRecord, memberUsage, vmId } from "./model.js";
import {
  type ClaimRecord,
  claimKey,
  type EnvDeps,
  mutateEnv,
  placementRequest,
  readEnv,
  rid,
  target,
} from "./ops.js";

export const MIGRATE_KIND = "environment.migrate";

/** The request, as the operation keeps it. */
export interface MigrateInput {
  [k: string]: JsonValue | undefined;
  env: string;
  /** Member ids to move; empty: every member (or, with `from`, every member on that agent). */
  members: string[];
  /** Bare destination agent id; "": placement chooses, per member, among the other agents. */
  agent: string;
  /** Only members placed on this agent (a drain); "": any. */
  from: string;
  /** vmenv.agent.v1.MigrationSettings as protobuf JSON, or null. */
  settings: JsonValue;
  /**
   * Why, in words, when something other than a user asked (e.g. "rebalance: agents/a1 at 92% > 85%"):
   * shown in the `select` step and in the moving member's state message.
   */
  reason?: string;
}

/** The states a member can be moved in; it ends in the same one. */
type MovableState = "RUNNING" | "PAUSED" | "STOPPED";

/** What `select` saved for each member to move. */
interface Moving {
  [k: string]: JsonValue | undefined;
  id: string;
  source: string;
  volumes: string[];
  /** The member's state when the move began (absent in operations started before cold migration). */
  state?: MovableState;
}

/** The state a member is moved in: a member found MIGRATING (a resumed move) was running. */
const movableState = (state: string): MovableState | undefined =>
  state === "RUNNING" || state === "MIGRATING"
    ? "RUNNING"
    : state === "PAUSED" || state === "STOPPED"
      ? state
      : undefined;

const agentName = (id: string) => `agents/${id}`;

/** How a call fails while its agent is gone (killed, restarting, cut off). */
const SOURCE_GONE = [Code.Unavailable, Code.Canceled, Code.DeadlineExceeded, Code.Unknown];
/** How long `perform` waits for a source agent that went away to answer again. */
const SOURCE_RESTART_GRACE_MS = 30_000;

function isUnreachable(err: unknown): boolean {
  if (err instanceof VmenvError) return err.code === "unavailable" || err.code === "deadline-exceeded";
  const ce = ConnectError.from(err);
  return ce.code === Code.Unavailable || ce.code === Code.DeadlineExceeded;
}

function memberNotFound(env: string, id: string): VmenvError {
  return new VmenvError("not-found", `member ${id} not found in environments/${env}`, {
    reason: "MEMBER_NOT_FOUND",
    metadata: { environment: `environments/${env}`, member: id },
  });
}

/**
 * The members a migration moves, in the order it moves them (priority order, balancers last); throws
 * NOT_FOUND for an unknown id and FAILED_PRECONDITION for a member that is neither running, paused nor
 * stopped.
 * Members already on `inp.agent` are left out (nothing to do).
 */
export function selectMembers(e: EnvRecord, inp: Pick<MigrateInput, "members" | "agent" | "from">) {
  for (const id of inp.members) if (!e.members.some((m) => m.id === id)) throw memberNotFound(e.id, id);
  const chosen = byPriority(e.members).filter(
    (m) =>
      (inp.members.length === 0 || inp.members.includes(m.id)) &&
      (!inp.from || m.agent === inp.from) &&
      !(inp.agent && m.agent === inp.agent),
  );
  for (const m of chosen) {
    if (!movableState(m.state) || !m.agent)
      throw failedPrecondition(
        `member ${m.id} of environments/${e.id} is ${m.state.toLowerCase()}: only running, paused and ` +
          "stopped members move (a lost member is recreated by its reschedule policy or EvacuateAgent)",
        "MEMBER_NOT_MOVABLE",
        { environment: `environments/${e.id}`, member: m.id, state: m.state },
      );
  }
  return [...chosen.filter((m) => m.kind !== "balancer"), ...chosen.filter((m) => m.kind === "balancer")];
}

/** The agent operation's VmMigrationProgress, if it carries one. */
function progressOf(metadata: Any | undefined): VmMigrationProgress | undefined {
  return metadata ? anyUnpack(metadata, VmMigrationProgressSchema) : undefined;
}

/** Percent of a member's migration done (memory sent, or storage copied while that runs), 0–100. */
export function migrationPercent(p: VmMigrationProgress): number {
  if (p.phase === VmMigrationPhase.COMPLETED) return 100;
  if (p.phase === VmMigrationPhase.STORAGE && p.storageTotalBytes > 0n)
    return Number((p.storageTransferredBytes * 50n) / p.storageTotalBytes);
  const total = p.memoryTotalBytes > 0n ? p.memoryTotalBytes : 0n;
  if (total === 0n) return 0;
  const sent = p.memoryTransferredBytes > total ? total : p.memoryTransferredBytes;
  return (
    (p.storageTotalBytes > 0n ? 50 : 0) + Number((sent * (p.storageTotalBytes > 0n ? 50n : 100n)) / total)
  );
}

/** The operation's metadata for the API: the VmMigrationProgress of the member being moved. */
export function packMigrationProgress(op: Pick<OpRecord, "kind" | "data">): Any | undefined {
  if (op.kind !== MIGRATE_KIND || !op.data.progress) return undefined;
  try {
    return anyPack(
      VmMigrationProgressSchema,
      fromJson(VmMigrationProgressSchema, op.data.progress as PbJson, { ignoreUnknownFields: true }),
    );
  } catch {
    return undefined;
  }
}

/**
 * Whether member `id` runs on its destination (its `finish` succeeded): from then on it only goes
 * forward. The flag in `op.data` is written as soon as the destination runs, before the step's
 * completion, and outlives the step's state (a rollback marks steps ROLLING_BACK as it goes).
 */
const finished = (op: Readonly<OpRecord>, id: string) =>
  op.data[`finished.${id}`] === true ||
  op.steps.some((s) => s.id === `finish.${id}` && s.state === "succeeded");

/** The "environment.migrate" kind. */
export function migrateKind(deps: EnvDeps): OperationKind {
  /** Runs `fn` on the destination during a rollback; an unreachable destination is left to the collector. */
  const onDestination = async (ctx: StepContext, dest: string, what: string, fn: () => Promise<void>) => {
    try {
      await fn();
    } catch (err) {
      if (!isUnreachable(err)) throw err;
      deps.logger.warn(
        { op: `operations/${ctx.op.id}`, agent: agentName(dest), what, err },
        "destination unreachable during rollback; what it holds is left to the collector",
      );
    }
  };

  const memberSteps = (inp: MigrateInput, mv: Moving, index: number, count: number): StepDef[] => {
    const env = inp.env;
    const id = mv.id;
    const src = mv.source;
    const name = `vms/${vmId(env, id)}`;
    /** What the member is, and ends as; a stopped member travels paused. */
    const was: MovableState = mv.state ?? "RUNNING";
    const paused = was !== "RUNNING";
    /** Whether the destination's VM has been finished (it runs, or stays paused, or was stopped since). */
    const tookOver = (s: VmState | undefined) =>
      paused ? s === VmState.PAUSED || s === VmState.STOPPED : s === VmState.RUNNING;
    const dest = (op: Readonly<OpRecord>) => (op.data[`dest.${id}`] as string | undefined) ?? "";
    const destOrThrow = (op: Readonly<OpRecord>) => {
      const d = dest(op);
      if (!d) throw new Error(`no destination recorded for ${id}`);
      return d;
    };
    const share = 100 / count;
    const progress = (ctx: StepContext, within: number, stage: string) =>
      ctx.progress(index * share + (within / 100) * share, stage);
    const steps: StepDef[] = [];

    /** Deletes the (paused, confirmed) source copy and its volumes; what fails is left to the collector. */
    const cleanSource = async (ctx: StepContext) => {
      try {
        // No abort signal: once the destination runs, the source goes, cancelled or not.
        const a: AgentTarget = { id: src, clients: deps.fleet.clients(src) };
        await deleteVm(a, env, id, rid(ctx, "delvm"));
        for (const v of mv.volumes) await deleteVolume(a, env, id, v, rid(ctx, `delvol-${v}`));
      } catch (err) {
        deps.logger.warn(
          { op: `operations/${ctx.op.id}`, agent: agentName(src), member: id, err },
          "could not remove the migrated VM from its source; left to the collector",
        );
      }
    };

    /** The member is the destination's: the claimed room becomes its, the source's goes back. */
    const switchRecord = async (
      tx: Txn,
      opId: string,
      to: string,
      end: { state: MovableState; message: string } = { state: was, message: "" },
    ) => {
      const e = await readEnv(tx, env);
      const m = e?.members.find((x) => x.id === id);
      if (m && m.agent === src) {
        await deps.fleet.release(tx, src, memberUsage(m));
        await mutateEnv(deps, tx, env, (x) => {
          const mm = x.members.find((y) => y.id === id);
          if (mm) {
            mm.agent = to;
            mm.state = end.state;
            mm.stateMessage = end.message;
          }
        });
      }
      if (await tx.get(claimKey(opId, id))) tx.del(claimKey(opId, id));
    };

    steps.push({
      id: `claim.${id}`,
      description: `choose a destination for ${id} (not agents/${src}) and claim room there`,
      async run(ctx) {
        progress(ctx, 0, `placing ${id}`);
        const e = await readEnv(deps.store, env);
        const m = e?.members.find((x) => x.id === id);
        if (!e || !m) throw memberNotFound(env, id);
        let to = dest(ctx.op);
        if (!to) {
          const policy = await deps.tree.effectivePolicy(deps.store, e.node);
          const req = placementRequest(
            { ...m, agent: "" },
            policy,
            e.members.filter((x) => x.id !== id),
          );
          if (inp.agent) req.agent = inp.agent;
          else delete req.agent;
          const candidates = deps.fleet.views().filter((v) => v.id !== src);
          to = place(req, candidates).agent;
          await ctx.save({ [`dest.${id}`]: to });
        }
        const destination = to;
        const usage = memberUsage(m);
        ctx.onComplete(async (tx) => {
          if (await tx.get(claimKey(ctx.op.id, id))) return;
          await deps.fleet.charge(tx, destination, usage);
          const c: ClaimRecord & { migrationFrom: string } = {
            op: ctx.op.id,
            env,
            member: id,
            agent: destination,
            node: e.node,
            usage: usageToStore(usage),
            deadlineMs: deps.clock.now() + deps.reservationTtlMs,
            migrationFrom: src,
          };
          tx.put(claimKey(ctx.op.id, id), c);
          await mutateEnv(deps, tx, env, (x) => {
            const mm = x.members.find((y) => y.id === id);
            if (mm && mm.agent === src) {
              mm.state = "MIGRATING";
              mm.stateMessage = `moving to agents/${destination}${inp.reason ? ` (${inp.reason})` : ""}`;
            }
          });
        });
      },
      async undo(ctx) {
        if (finished(ctx.op, id)) return;
        await deps.store.transact(async (tx) => {
          const c = await tx.get<ClaimRecord>(claimKey(ctx.op.id, id));
          if (c) {
            await deps.fleet.release(tx, c.agent, usageFromStore(c.usage as StoredUsage));
            tx.del(claimKey(ctx.op.id, id));
          }
          await mutateEnv(deps, tx, env, (x) => {
            const mm = x.members.find((y) => y.id === id);
            if (mm && mm.agent === src && mm.state === "MIGRATING") {
              mm.state = was;
              mm.stateMessage = "";
            }
          });
        });
      },
    });

    if (mv.volumes.length > 0)
      steps.push({
        id: `volumes.${id}`,
        description: `create the volumes of ${id} on its destination`,
        async run(ctx) {
          const to = destOrThrow(ctx.op);
          progress(ctx, 5, `creating the volumes of ${id} on agents/${to}`);
          const m = (await readEnv(deps.store, env))?.members.find((x) => x.id === id);
          if (!m) throw memberNotFound(env, id);
          const a = target(deps, ctx, to);
          // Blank volumes of the same size and format: their contents come with the migration.
          for (const v of m.volumes)
            await ensureVolume(a, env, id, { ...v, imageUri: "" }, rid(ctx, `vol-${v.id}`));
        },
        async undo(ctx) {
          const to = dest(ctx.op);
          if (finished(ctx.op, id) || !to) return;
          await onDestination(ctx, to, "volumes", async () => {
            const a = target(deps, ctx, to);
            for (const v of mv.volumes) await deleteVolume(a, env, id, v, rid(ctx, `undo-vol-${v}`));
          });
        },
      });

    if (was === "STOPPED")
      steps.push({
        id: `wake.${id}`,
        description: `start the VMM of ${id} paused on agents/${src}, so that it and its disks can be sent`,
        agent: agentName(src),
        async run(ctx) {
          progress(ctx, 8, `starting the VMM of ${id} paused on agents/${src}`);
          const a = target(deps, ctx, src);
          const vm = await getVm(a, env, id);
          if (vm?.state === VmState.STOPPED || vm?.state === VmState.CRASHED)
            await waitAgentOp(
              a,
              await a.clients.vms.startVm({ name, paused: true, requestId: rid(ctx, "wake") }),
            );
        },
        async undo(ctx) {
          if (finished(ctx.op, id)) return;
          // Stopped again, as the member was: its guest never ran, so nothing is lost.
          await stopVm(target(deps, ctx, src), env, id, rid(ctx, "undo-wake"), { force: true });
        },
      });

    steps.push({
      id: `prepare.${id}`,
      description: `prepare the destination of ${id} (incoming VMM)`,
      async run(ctx) {
        const to = destOrThrow(ctx.op);
        progress(ctx, 10, `preparing agents/${to} for ${id}`);
        const source = target(deps, ctx, src);
        const vm = await getVm(source, env, id);
        if (!vm)
          throw new VmenvError("failed-precondition", `${name} is missing on agents/${src}`, {
            reason: "MEMBER_VM_MISSING",
            metadata: { vm: name, agent: agentName(src), member: id },
          });
        const a = target(deps, ctx, to);
        const op = await a.clients.vms.prepareVmMigration({
          vmId: vmId(env, id),
          // The VM as the source has it: spec, labels, restart policy, devices (NICs keep their MACs).
          vm,
          receiveStorage: mv.volumes.length > 0,
          requestId: rid(ctx, "prepare"),
        });
        const done = await waitAgentOp(a, op);
        const t = done.result ? anyUnpack(done.result, VmMigrationTargetSchema) : undefined;
        if (!t?.migrationUri)
          throw new VmenvError("internal", `agents/${to} prepared ${name} but gave no migration address`, {
            reason: "MIGRATION_TARGET_MISSING",
            metadata: { agent: agentName(to), vm: name },
          });
        await ctx.save({ [`target.${id}`]: { migrationUri: t.migrationUri, storageUri: t.storageUri } });
      },
      async undo(ctx) {
        const to = dest(ctx.op);
        if (finished(ctx.op, id) || !to) return;
        await onDestination(ctx, to, "incoming VM", () =>
          deleteVm(target(deps, ctx, to), env, id, rid(ctx, "undo-prepare")),
        );
      },
    });

    steps.push({
      id: `perform.${id}`,
      description: `live-migrate ${id} from agents/${src}`,
      agent: agentName(src),
      async run(ctx) {
        const to = destOrThrow(ctx.op);
        const t = ctx.op.data[`target.${id}`] as { migrationUri: string; storageUri: string } | undefined;
        if (!t) throw new Error(`no migration target recorded for ${id}`);
        const a = target(deps, ctx, src);
        let opName = ctx.step.agentOperation;
        if (!opName) {
          const started = await a.clients.vms.migrateVm({
            name,
            migrationUri: t.migrationUri,
            storageUri: t.storageUri,
            ...(inp.settings
              ? {
                  settings: fromJson(MigrationSettingsSchema, inp.settings as PbJson, {
                    ignoreUnknownFields: true,
                  }),
                }
              : {}),
            requestId: rid(ctx, "migrate"),
          });
          opName = started.name;
          await ctx.recordAgentOperation(agentName(src), opName);
        }
        // Wait for its end a second at a time, copying the progress into this operation meanwhile. The
        // agent answers WaitOperation the moment the migration ends, and the guest is paused from then
        // until `finish` starts it on the destination: no polling interval may stand in between.
        let lastSave = 0;
        let unreachableSince = 0;
        for (;;) {
          const asked = deps.clock.now();
          let cur: Awaited<ReturnType<typeof a.clients.diagnostics.waitOperation>>;
          try {
            cur = await a.clients.diagnostics.waitOperation(
              { name: opName, timeout: durationFromMs(1000) },
              { timeoutMs: 10_000, signal: ctx.signal },
            );
          } catch (err) {
            const ce = ConnectError.from(err);
            if (ctx.signal.aborted) throw err;
            // The source agent went away (killed, restarting): wait for it a while, then ask again.
            if (SOURCE_GONE.includes(ce.code)) {
              unreachableSince ||= deps.clock.now();
              if (deps.clock.now() - unreachableSince < SOURCE_RESTART_GRACE_MS) {
                await new Promise((r) => setTimeout(r, 500));
                continue;
              }
            }
            if (!isNotFound(ce)) throw err;
            // The source agent restarted and forgot its operation. At start it settled the send: a
            // source still MIGRATING completed it (the destination holds the whole guest; finish
            // checks that before starting it); one that runs again rolled it back.
            const vm = await getVm(a, env, id);
            if (vm?.state === VmState.MIGRATING) {
              deps.logger.info(
                { op: `operations/${ctx.op.id}`, agent: agentName(src), member: id },
                "the source agent restarted after the migration completed; going on to finish",
              );
              return;
            }
            throw new VmenvError(
              "aborted",
              `agents/${src} restarted during the migration of ${id} and rolled it back (the VM is ${vm ? VmState[vm.state]?.toLowerCase() : "gone"} there)`,
              { reason: "MIGRATION_ROLLED_BACK", metadata: { agent: agentName(src), vm: name, member: id } },
            );
          }
          unreachableSince = 0;
          const p = progressOf(cur.metadata);
          if (p) {
            progress(
              ctx,
              20 + (migrationPercent(p) * 70) / 100,
              `migrating ${id} to agents/${to} (${VmMigrationPhase[p.phase]?.toLowerCase() ?? "?"}, ${migrationPercent(p)}%)`,
            );
            const now = deps.clock.now();
            if (now - lastSave >= 1000 || cur.state !== AgentOpState.RUNNING) {
              lastSave = now;
              await ctx.save({ progress: toJson(VmMigrationProgressSchema, p) as JsonValue, moving: id });
            }
          }
          if (cur.state !== AgentOpState.RUNNING && cur.state !== AgentOpState.PENDING) {
            await waitAgentOp({ id: a.id, clients: a.clients, signal: ctx.signal }, cur);
            return;
          }
          // An agent that answers at once while the migration runs (it does not wait): ask again later.
          const waited = deps.clock.now() - asked;
          if (waited >= 250) continue;
          await new Promise<void>((resolve, reject) => {
            const timer = setTimeout(resolve, 250 - waited);
            ctx.signal.addEventListener(
              "abort",
              () => {
                clearTimeout(timer);
                reject(ctx.signal.reason);
              },
              { once: true },
            );
          });
        }
      },
      async undo(ctx) {
        if (finished(ctx.op, id)) return;
        const a = target(deps, ctx, src);
        const opName = ctx.step.agentOperation;
        if (opName) {
          try {
            await a.clients.diagnostics.cancelOperation({ name: opName });
          } catch (err) {
            const ce = ConnectError.from(err);
            // Finished already (or forgotten by the agent): nothing to cancel.
            if (ce.code !== Code.FailedPrecondition && !isNotFound(ce)) throw err;
          }
          await waitSettled(a, opName);
        }
        // Completed but not confirmed, the source waits (MIGRATING): ResumeVm rolls it back, running or
        // paused as it was. A member that was paused stays paused.
        const vm = await getVm(a, env, id);
        if (vm && (vm.state === VmState.MIGRATING || (!paused && vm.state === VmState.PAUSED)))
          await a.clients.vms.resumeVm({ name, requestId: rid(ctx, "undo-resume") });
      },
    });

    steps.push({
      id: `finish.${id}`,
      description: `start ${id} on its destination`,
      async run(ctx) {
        const to = destOrThrow(ctx.op);
        // Run again after a crash that followed the destination's start: the member only goes forward
        // now, even if the destination died since (its failure detection takes it from there).
        if (finished(ctx.op, id)) return;
        progress(ctx, 92, `starting ${id} on agents/${to}`);
        const a = target(deps, ctx, to);
        const vm = await getVm(a, env, id);
        if (!tookOver(vm?.state))
          await waitAgentOp(
            a,
            await a.clients.vms.finishVmMigration({ name, paused, requestId: rid(ctx, "finish") }),
          );
        await ctx.save({ [`finished.${id}`]: true });
      },
      async undo(ctx) {
        const to = dest(ctx.op);
        if (finished(ctx.op, id) || !to) return;
        let runs = false;
        await onDestination(ctx, to, "VM", async () => {
          const a = target(deps, ctx, to);
          runs = tookOver((await getVm(a, env, id))?.state);
          if (!runs) await deleteVm(a, env, id, rid(ctx, "undo-finish"));
        });
        if (!runs) return;
        // Finish took effect although its step did not complete (cancelled or failed after the
        // destination started): the destination runs the guest, so the member goes forward instead.
        await ctx.save({ [`finished.${id}`]: true });
        await cleanSource(ctx);
        await deps.store.transact((tx) => switchRecord(tx, ctx.op.id, to));
      },
    });

    steps.push({
      id: `confirm.${id}`,
      description: `remove ${id} from agents/${src} and record it on its destination`,
      agent: agentName(src),
      async run(ctx) {
        // Never fails (a cancel does not stop it either): the member runs on its destination.
        const to = destOrThrow(ctx.op);
        progress(ctx, 97, `removing ${id} from agents/${src}`);
        await cleanSource(ctx);
        let end = { state: was, message: "" };
        if (was === "STOPPED") {
          try {
            await stopVm({ id: to, clients: deps.fleet.clients(to) }, env, id, rid(ctx, "stop"), {
              force: true,
            });
          } catch (err) {
            // It never ran: paused is what it is, and says so; StopEnvironment stops it.
            deps.logger.warn(
              { op: `operations/${ctx.op.id}`, member: id, err },
              "could not stop a cold-migrated VM",
            );
            end = {
              state: "PAUSED",
              message: `moved stopped, but could not be stopped on agents/${to}: ${(err as Error).message}`,
            };
          }
        }
        ctx.onComplete((tx) => switchRecord(tx, ctx.op.id, to, end));
      },
    });
    return steps;
  };

  return {
    kind: MIGRATE_KIND,
    lock: (op) => (op.input as MigrateInput).env,
    cancellable: true,
    afterCrash: "resume",
    plan(op) {
      const inp = op.input as MigrateInput;
      const steps: StepDef[] = [
        {
          id: "select",
          description: `choose the members to move and their order${inp.reason ? ` (${inp.reason})` : ""}`,
          async run(ctx) {
            let moving = ctx.op.data.moving_members as Moving[] | undefined;
            if (!moving) {
              const e = await readEnv(deps.store, inp.env);
              if (!e) throw notFound("environment", `environments/${inp.env}`);
              if (inp.agent && !deps.fleet.views().some((v) => v.id === inp.agent))
                throw notFound("agent", agentName(inp.agent));
              moving = selectMembers(e, inp).map((m) => ({
                id: m.id,
                source: m.agent,
                volumes: m.volumes.map((v) => v.id),
                state: movableState(m.state) ?? "RUNNING",
              }));
              await ctx.save({ moving_members: moving });
            }
            if (moving.length > 0)
              ctx.onComplete(async (tx) => {
                await mutateEnv(deps, tx, inp.env, (x) => {
                  x.transition = "MIGRATING";
                });
              });
          },
        },
      ];
      const moving = (op.data.moving_members ?? []) as Moving[];
      moving.forEach((mv, i) => {
        steps.push(...memberSteps(inp, mv, i, moving.length));
      });
      return steps;
    },
    async result(op, tx) {
      const e = await mutateEnv(deps, tx, (op.input as MigrateInput).env, (x) => {
        x.transition = "";
      });
      return e ? envResult(e) : undefined;
    },
    async onFailed(op, tx) {
      await mutateEnv(deps, tx, (op.input as MigrateInput).env, (x) => {
        x.transition = "";
      });
    },
  };
}

/** Waits (up to a minute) until an agent operation is no longer running. */
async function waitSettled(a: AgentTarget, name: string): Promise<void> {
  for (let i = 0; i < 3; i++) {
    try {
      const cur = await a.clients.diagnostics.waitOperation(
        { name, timeout: durationFromMs(20_000) },
        { timeoutMs: 30_000 },
      );
      if (cur.state !== AgentOpState.RUNNING && cur.state !== AgentOpState.PENDING) return;
    } catch (err) {
      if (isNotFound(ConnectError.from(err))) return;
      throw err;
    }
  }
}
