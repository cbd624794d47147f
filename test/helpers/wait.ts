import { setTimeout as sleep } from 'node:timers/promises';

/** Polls `condition` every 20 ms until it holds; throws naming `what` after `timeoutMs`. */
export async function until(condition: () => boolean | Promise<boolean>, timeoutMs = 5000, what = 'condition'): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

/**
 * DESIGN §9b: a registry change reaches the gateway's decision cache through NOTIFY, and must be
 * seen by CONNECTs from 100 ms after its commit while the feed is up. A CONNECT sent the instant a
 * revoking command exits may still beat the notification (seen in CI under load); a test of what
 * the revocation does waits out the bound first.
 */
export const FEED_VISIBILITY_MS = 100;

export function pastFeedBound(): Promise<void> {
  return sleep(FEED_VISIBILITY_MS);
}
