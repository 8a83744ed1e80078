import { describe, expect, it } from "vitest";
import {
  checkMigrationUri,
  migrationPercent,
  parseStorageUri,
  progressFromQuery,
  uriHost,
} from "./migration-domain.js";

describe("migration addresses", () => {
  it("accepts tcp:host:port and refuses anything else, naming the field", () => {
    expect(checkMigrationUri("tcp:127.0.0.1:4444")).toBe("tcp:127.0.0.1:4444");
    expect(checkMigrationUri("tcp:[::1]:4444")).toBe("tcp:[::1]:4444");
    for (const bad of ["unix:/tmp/x", "tcp:host", "tcp:h:0", "tcp:h:70000", "exec:rm -rf /", "tcp:a b:1"]) {
      expect(() => checkMigrationUri(bad)).toThrow(/migration address/);
    }
  });

  it("parses NBD servers over TCP and Unix sockets", () => {
    expect(parseStorageUri("nbd://10.0.0.7:10809")).toEqual({
      type: "inet",
      host: "10.0.0.7",
      port: "10809",
    });
    expect(parseStorageUri("nbd://[::1]:10809")).toEqual({ type: "inet", host: "::1", port: "10809" });
    expect(parseStorageUri("nbd:unix:/run/x.sock")).toEqual({ type: "unix", path: "/run/x.sock" });
    expect(() => parseStorageUri("nbd://h")).toThrow(/NBD address/);
    expect(() => parseStorageUri("http://h:1")).toThrow(/NBD address/);
    expect(uriHost("::1")).toBe("[::1]");
    expect(uriHost("10.0.0.7")).toBe("10.0.0.7");
  });
});

describe("migration progress", () => {
  it("reads query-migrate into phases and figures", () => {
    const p = progressFromQuery(
      {
        status: "active",
        "expected-downtime": 12,
        "cpu-throttle-percentage": 20,
        ram: {
          transferred: 100,
          remaining: 300,
          total: 1000,
          "dirty-pages-rate": 10,
          "page-size": 4096,
          "dirty-sync-count": 2,
        },
      },
      { transferred: 5, total: 10 },
    );
    expect(p).toEqual({
      phase: "pre-copy",
      storageTransferredBytes: 5,
      storageTotalBytes: 10,
      memoryTransferredBytes: 100,
      memoryRemainingBytes: 300,
      memoryTotalBytes: 1000,
      dirtyRateBytesPerSecond: 40960,
      iterations: 2,
      expectedDowntimeMs: 12,
      cpuThrottlePercent: 20,
    });
    expect(progressFromQuery({ status: "pre-switchover" }, { transferred: 0, total: 0 }).phase).toBe(
      "switchover",
    );
    expect(progressFromQuery({ status: "postcopy-active" }, { transferred: 0, total: 0 }).phase).toBe(
      "post-copy",
    );
    expect(progressFromQuery({ status: "completed" }, { transferred: 0, total: 0 }).phase).toBe("completed");
  });

  it("weighs storage before memory in the operation's percentage", () => {
    const base = progressFromQuery(
      { status: "active", ram: { transferred: 50, remaining: 50 } },
      {
        transferred: 10,
        total: 10,
      },
    );
    expect(migrationPercent(base, false)).toBe(49);
    expect(migrationPercent(base, true)).toBe(69);
    expect(migrationPercent({ ...base, phase: "storage", storageTransferredBytes: 5 }, true)).toBe(20);
    expect(migrationPercent({ ...base, phase: "completed" }, true)).toBe(100);
  });
});
