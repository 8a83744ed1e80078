import type { Server } from "node:http";
import type { ServiceBinding } from "@vmenv/rpc";
import { VmenvError } from "@vmenv/rpc/errors";
import type { Logger } from "pino";
import type { VmChange, VmManager } from "../vmm/manager.js";
import { operationLogFields } from "./context.js";
import { ErrorLog } from "./errors.js";
import { LogRing } from "./logs.js";
import { StatsMetrics } from "./metrics.js";
import type { OperationChange, Operations } from "./operations.js";
import { type DiagnosticsDeps, diagnosticsService } from "./rpc.js";
import { statsVms } from "./sources.js";
import { StatsSampler } from "./stats.js";

/**
 * The agent's diagnostics, put together: the log ring its logger tees into, the error record, the
 * statistics sampler, the Prometheus endpoint, and DiagnosticsService over them.
 */
export class Diagnostics {
  readonly logs: LogRing;
  readonly errors: ErrorLog;
  #stats: StatsSampler | undefined;
  #metrics: Server | undefined;
  #unsubscribe: (() => void)[] = [];

  constructor(private readonly now: () => number = Date.now) {
    this.logs = new LogRing(5000);
    this.errors = new ErrorLog(now, 1000);
  }

  /** What `createLogger` needs to tee every line into the ring, with the operation it was logged for. */
  get loggerExtras() {
    return { tee: this.logs, mixin: operationLogFields };
  }

  /** DiagnosticsService over the agent's operations and VMs. */
  service(d: { operations: Operations; pack: DiagnosticsDeps["pack"]; vms: VmManager }): ServiceBinding {
    this.#stats ??= new StatsSampler({ vms: statsVms(d.vms), now: this.now });
    this.#recordCrashes(d.vms);
    return diagnosticsService({
      operations: d.operations,
      pack: d.pack,
      errors: this.errors,
      logs: this.logs,
      stats: this.#stats,
      checkVm: (id) => void d.vms.get(id),
    });
  }

  /**
   * Once the agent runs: operations are logged as they start and end, VM crashes become errors, and
   * the Prometheus endpoint listens when it is configured. Resolves with its address.
   */
  async start(d: {
    operations: Operations;
    vms: VmManager;
    logger: Logger;
    metricsListen: { host: string; port: number } | undefined;
  }): Promise<string | undefined> {
    const onOp = ({ type, op: o }: OperationChange) => {
      const line = { operation: `operations/${o.id}`, target: o.target, kind: o.kind };
      if (type === "created") d.logger.info(line, "operation started");
      if (type !== "updated") return;
      if (o.endTimeMs === undefined)
        d.logger.debug({ ...line, percent: o.percent, stage: o.stage }, "operation progress");
      else if (o.state !== "failed")
        d.logger.info(
          { ...line, durationMs: o.endTimeMs - (o.startTimeMs ?? o.createTimeMs) },
          `operation ${o.state}`,
        );
    };
    d.operations.on("change", onOp);
    this.#unsubscribe.push(() => d.operations.off("change", onOp));

    if (!d.metricsListen || !this.#stats) return undefined;
    const sampler = this.#stats;
    const m = new StatsMetrics(() => sampler.sample());
    const { server, address } = await m.listen(d.metricsListen.host, d.metricsListen.port, (err) =>
      d.logger.error({ err }, "statistics sample for /metrics failed"),
    );
    this.#metrics = server;
    d.logger.info({ metricsAddress: address }, "metrics endpoint listening");
    return address;
  }

  /** From now on (the VMs' re-adoption included), a VM crash is recorded as an error. */
  #recordCrashes(vms: VmManager): void {
    // A crash is an error outside any operation: the VMM ended without being asked to.
    const crashed = new Set<string>();
    const onVm = (c: VmChange) => {
      const id = c.vm.id;
      if (c.type !== "deleted" && c.vm.state === "crashed") {
        if (crashed.has(id)) return;
        crashed.add(id);
        const message = `vms/${id} crashed: ${c.vm.stateMessage || "its VMM ended"}; its console log (vmenv vm console ${id}) tells why; start it again, or set a restart policy`;
        this.errors.record({
          timeMs: c.timeMs,
          reason: "VM_CRASHED",
          message,
          target: `vms/${id}`,
          element: "",
          operation: "",
          error: new VmenvError("aborted", message, { reason: "VM_CRASHED", metadata: { vm: `vms/${id}` } }),
        });
      } else crashed.delete(id);
    };
    vms.on("change", onVm);
    this.#unsubscribe.push(() => vms.off("change", onVm));
  }

  async stop(): Promise<void> {
    for (const u of this.#unsubscribe.splice(0)) u();
    const s = this.#metrics;
    this.#metrics = undefined;
    if (s) await new Promise<void>((r) => s.close(() => r()));
  }
}
