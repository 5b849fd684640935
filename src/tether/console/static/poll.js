// A view's live refresh: one call at a time (never overlapping, so a slow router is not piled onto),
// the next one `interval` ms after the previous ended, none while the tab is hidden (a forgotten tab
// costs the router nothing), and nothing once the view is left.

export class Poller {
  constructor(fn, interval, onError) {
    this.fn = fn;
    this.interval = interval;
    this.onError = onError;
    this.controller = new AbortController();
    this.running = false;
    this.again = false;
    this.stopped = false;
    this.timer = 0;
    this.onVisible = () => {
      if (!document.hidden) this.now();
    };
    document.addEventListener("visibilitychange", this.onVisible);
  }

  start() {
    this.tick();
    return this;
  }

  // Refresh at once (the filters changed): a call in flight with the old filters is abandoned.
  now() {
    if (this.stopped) return;
    if (this.running) {
      this.controller.abort();
      this.controller = new AbortController();
      this.again = true;
      return;
    }
    this.tick();
  }

  async tick() {
    if (this.stopped) return;
    clearTimeout(this.timer);
    if (document.hidden) return; // picked up again by onVisible
    this.running = true;
    try {
      await this.fn(this.controller.signal);
    } catch (err) {
      if (err.name !== "AbortError" && !this.stopped && this.onError) this.onError(err);
    } finally {
      this.running = false;
    }
    if (this.stopped) return;
    if (this.again) {
      this.again = false;
      this.tick();
      return;
    }
    this.timer = setTimeout(() => this.tick(), this.interval);
  }

  stop() {
    this.stopped = true;
    document.removeEventListener("visibilitychange", this.onVisible);
    clearTimeout(this.timer);
    this.controller.abort();
  }
}
