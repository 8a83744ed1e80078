import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { OperationService, type OperationState, WatchEventType } from "@vmenv/api/coordinator/v1";
import { bind, invalidArgument, noFilter, type ServiceBinding } from "@vmenv/rpc";
import { fromPbOpState, type PackOperation, toPbOperation } from "./convert.js";
import { isFinal, type OperationEngine } from "./engine.js";
import type { OpRecord, OpState } from "./types.js";
import { OpChangeLog, watchOps } from "./watch.js";

/** `operations/{id}` (or a bare id) → id; INVALID_ARGUMENT naming `field` otherwise. */
export function operationId(name: string, field = "name"): string {
  const m = /^(?:operations\/)?([a-z0-9][a-z0-9-]{0,99})$/.exec(name);
  if (!m?.[1])
    throw invalidArgument(field, `"${name.slice(0, 80)}" is not an operation name (operations/{operation})`);
  return m[1];
}

const DEFAULT_WAIT_MS = 60_000;
const MAX_WAIT_MS = 600_000;

function statesOf(states: OperationState[], field: string): OpState[] {
  return states.map((s) => {
    const st = fromPbOpState(s);
    if (!st) throw invalidArgument(field, `${s} is not an operation state`);
    return st;
  });
}

/**
 * OperationService over the engine: Get, List, Wait, Cancel and Watch. `pack` turns what an operation
 * produced into the API's Any (`result`, e.g. an Environment) and kind-specific `metadata`.
 */
export function operationService(engine: OperationEngine, pack: PackOperation): ServiceBinding {
  const changes = new OpChangeLog(engine);
  const pb = (op: OpRecord) => toPbOperation(op, pack, engine.mayCancel(op));
  return bind(OperationService, {
    async getOperation(req) {
      return pb(await engine.get(operationId(req.name)));
    },
    async listOperations(req) {
      noFilter(req.filter, "use states, kind, target, parent and request_id");
      const r = await engine.list({
        states: statesOf(req.states, "states"),
        kind: req.kind,
        target: req.target,
        parent: req.parent ? operationId(req.parent, "parent") : "",
        requestId: req.requestId,
        pageSize: req.pageSize,
        pageToken: req.pageToken,
      });
      return { operations: r.ops.map(pb), nextPageToken: r.next };
    },
    async waitOperation(req, ctx) {
      const id = operationId(req.name);
      let ms = DEFAULT_WAIT_MS;
      if (req.timeout) {
        ms = Number(req.timeout.seconds) * 1000 + req.timeout.nanos / 1e6;
        if (!(ms >= 0)) throw invalidArgument("timeout", "must not be negative");
      }
      return pb(await engine.wait(id, Math.min(ms, MAX_WAIT_MS), ctx.signal));
    },
    async cancelOperation(req) {
      return pb(await engine.cancel(operationId(req.name)));
    },
    async *watchOperations(req, ctx) {
      noFilter(req.filter, "use states, kind, target and root");
      const states = new Set(statesOf(req.states, "states"));
      const root = req.root ? operationId(req.root, "root") : "";
      /** The root and its descendants seen so far (children are announced after their parent). */
      const tree = new Set<string>(root ? [root] : []);
      const inTree = (op: OpRecord) => {
        if (!root) return true;
        if (tree.has(op.id)) return true;
        if (op.parent && tree.has(op.parent)) {
          tree.add(op.id);
          return true;
        }
        return false;
      };
      const match = (op: OpRecord) =>
        (states.size === 0 || states.has(op.state)) &&
        (!req.kind || op.kind === req.kind) &&
        (!req.target || op.target === req.target) &&
        inTree(op);
      const snapshot = async (): Promise<OpRecord[]> => {
        if (root) {
          const out: OpRecord[] = [];
          const todo = [root];
          while (todo.length > 0) {
            const op = await engine.get(todo.shift() as string).catch(() => undefined);
            if (!op) continue;
            tree.add(op.id);
            if (match(op) && (states.size > 0 || !isFinal(op.state))) out.push(op);
            todo.push(...op.children);
          }
          return out;
        }
        const wanted: OpState[] = states.size > 0 ? [...states] : ["pending", "running", "rolling_back"];
        const out: OpRecord[] = [];
        let pageToken = "";
        do {
          const r = await engine.list({
            states: wanted,
            kind: req.kind,
            target: req.target,
            pageSize: 1000,
            pageToken,
          });
          out.push(...r.ops);
          pageToken = r.next;
        } while (pageToken);
        return out.reverse();
      };
      if (root) await engine.get(root);
      for await (const item of watchOps(changes, {
        resumeToken: req.resumeToken,
        signal: ctx.signal,
        snapshot,
        match,
      })) {
        const resumeToken = changes.token(item.seq);
        const ev =
          item.kind === "synced"
            ? { type: WatchEventType.SYNCED, resumeToken, eventTime: timestampFromMs(Date.now()) }
            : item.kind === "initial"
              ? {
                  type: WatchEventType.INITIAL,
                  operation: pb(item.op),
                  resumeToken,
                  eventTime: timestampFromMs(Date.now()),
                }
              : {
                  type: item.type === "created" ? WatchEventType.CREATED : WatchEventType.UPDATED,
                  operation: pb(item.op),
                  resumeToken,
                  eventTime: timestampFromMs(item.timeMs),
                };
        yield ev;
      }
    },
  });
}
