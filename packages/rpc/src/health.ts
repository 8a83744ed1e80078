import { Code, ConnectError, type ServiceImpl } from "@connectrpc/connect";
import { Health, HealthCheckResponse_ServingStatus as Status } from "@vmenv/api/grpc/health/v1";

export { Status as ServingStatus };

/**
 * Serving status per service name ("" is the server as a whole), as grpc.health.v1 defines it. The
 * server sets every registered service SERVING when it listens and NOT_SERVING when it shuts down;
 * daemons may change a service's status (e.g. a backend that went away).
 */
export class HealthRegistry {
  readonly #status = new Map<string, Status>();
  readonly #watchers = new Set<(service: string, status: Status) => void>();

  set(service: string, status: Status): void {
    if (this.#status.get(service) === status) return;
    this.#status.set(service, status);
    for (const w of this.#watchers) w(service, status);
  }

  /** Sets every known service (and the server as a whole) to `status`. */
  setAll(status: Status): void {
    for (const service of [...this.#status.keys()]) this.set(service, status);
  }

  get(service: string): Status | undefined {
    return this.#status.get(service);
  }

  entries(): IterableIterator<[string, Status]> {
    return this.#status.entries();
  }

  /** Calls `fn` on every status change until the returned function is called. */
  subscribe(fn: (service: string, status: Status) => void): () => void {
    this.#watchers.add(fn);
    return () => this.#watchers.delete(fn);
  }
}

/** grpc.health.v1.Health over a registry. Watch sends the current status, then every change. */
export function healthService(registry: HealthRegistry): ServiceImpl<typeof Health> {
  return {
    list() {
      const statuses: Record<string, { status: Status }> = {};
      for (const [service, status] of registry.entries()) statuses[service] = { status };
      return { statuses };
    },
    check(req) {
      const status = registry.get(req.service);
      if (status === undefined) throw new ConnectError(`unknown service "${req.service}"`, Code.NotFound);
      return { status };
    },
    async *watch(req, ctx) {
      // A queue of statuses to send; only the newest matters, so it holds at most one.
      let pending: Status | undefined = registry.get(req.service) ?? Status.SERVICE_UNKNOWN;
      let wake: (() => void) | undefined;
      const unsubscribe = registry.subscribe((service, status) => {
        if (service !== req.service) return;
        pending = status;
        wake?.();
      });
      const aborted = new Promise<void>((resolve) =>
        ctx.signal.addEventListener("abort", () => resolve(), { once: true }),
      );
      try {
        let last: Status | undefined;
        while (!ctx.signal.aborted) {
          if (pending !== undefined && pending !== last) {
            last = pending;
            pending = undefined;
            yield { status: last };
            continue;
          }
          pending = undefined;
          await Promise.race([new Promise<void>((resolve) => (wake = resolve)), aborted]);
        }
        throw ctx.signal.reason instanceof ConnectError
          ? ctx.signal.reason
          : new ConnectError("watch ended", Code.Canceled);
      } finally {
        unsubscribe();
      }
    },
  };
}

export { Health };
