import { describe, expect, it } from "vitest";
import { type ChEvent, exitCauseOf, parseChEvents, vmmSignalOf } from "./events.js";

/** An event as cloud-hypervisor writes it: pretty-printed JSON, then a blank line. */
function written(source: string, event: string, properties: Record<string, string> | null = null): string {
  const e = { timestamp: { secs: 1, nanos: 500_000_000 }, source, event, properties };
  return `${JSON.stringify(e, null, 2)}\n\n`;
}

const ev = (source: string, event: string): ChEvent => ({ source, event, timeMs: 0, properties: {} });

describe("the event monitor file", () => {
  it("parses complete events and keeps an unfinished one for the next read", () => {
    const text =
      written("vmm", "starting") + written("vm", "device-removed", { id: "disk0", bdf: "0000:00:06.0" });
    const cut = text.length - 10;
    const first = parseChEvents(text.slice(0, cut));
    expect(first.events).toEqual([{ source: "vmm", event: "starting", timeMs: 1500, properties: {} }]);
    const second = parseChEvents(first.rest + text.slice(cut));
    expect(second).toEqual({
      events: [
        {
          source: "vm",
          event: "device-removed",
          timeMs: 1500,
          properties: { id: "disk0", bdf: "0000:00:06.0" },
        },
      ],
      rest: "",
    });
  });

  it("skips what is not an event: garbage, braces inside strings, objects without source and event", () => {
    const text = `garbage {"a": 1}\n\n${written("vm", "paused", { note: "a } and a { in a string" })}`;
    expect(parseChEvents(text).events.map((e) => e.event)).toEqual(["paused"]);
  });

  it("says why the VMM ended", () => {
    const orderly = [ev("vmm", "starting"), ev("vm", "shutdown"), ev("vm", "deleted"), ev("vmm", "shutdown")];
    expect(exitCauseOf(orderly, false)).toBe("guest-shutdown");
    expect(exitCauseOf(orderly, true)).toBe("host-request");
    expect(exitCauseOf([ev("vmm", "starting"), ev("vm", "booted")], false)).toBe("unknown");
    expect(exitCauseOf([...orderly.slice(0, 1), ev("guest", "panic"), ...orderly.slice(1)], false)).toBe(
      "unknown",
    );
    // Only the last run counts.
    expect(exitCauseOf([...orderly, ev("vmm", "starting"), ev("vm", "booted")], false)).toBe("unknown");
  });

  it("maps the VM's lifecycle events to the driver's", () => {
    expect(
      [
        ev("vm", "paused"),
        ev("vm", "resumed"),
        ev("vm", "rebooting"),
        ev("vm", "booted"),
        ev("vmm", "paused"),
      ].map(vmmSignalOf),
    ).toEqual(["stop", "resume", "reset", undefined, undefined]);
  });
});
