/**
 * The bounded, coalescing lookup queue in front of the registry (DESIGN §9a): identical lookups
 * share one query, a lookup whose CONNECTs are gone never starts, the queue is bounded in count
 * and in wait. Pure: the lookup function is a controllable promise, no database.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setImmediate } from 'node:timers/promises';
import type { AuthorizationRequest, AuthorizationResult } from '../../registry/authorize.js';
import { RegistryUnavailableError } from '../../registry/errors.js';
import { LookupCancelledError, LookupQueue, MAX_STRANGER_LOOKUPS_PER_SESSION } from '../../gateway/src/lookups.js';

/** Lets the queue's deferred pump run (it starts lookups on setImmediate, after the settling microtasks). */
const tick = async () => {
  await setImmediate();
  await setImmediate();
};

const ALLOWED = { allowed: true, permissionId: 'perm-1', verdicts: [] } as unknown as AuthorizationResult;
const request = (destination: string, identity = 'agent-alpha'): AuthorizationRequest => ({ identity, spkiDer: Buffer.from('spki'), destination });

/** A lookup function whose calls the test settles by hand. */
function controlled() {
  const calls: { request: AuthorizationRequest; resolve: (r: AuthorizationResult) => void; reject: (e: unknown) => void }[] = [];
  const lookup = (req: AuthorizationRequest) => new Promise<AuthorizationResult>((resolve, reject) => calls.push({ request: req, resolve, reject }));
  return { calls, lookup };
}

/** Answers every lookup, those started meanwhile too, until none waits or runs. */
async function drain(queue: LookupQueue, calls: ReturnType<typeof controlled>['calls']): Promise<void> {
  while (queue.queued > 0 || queue.running > 0) {
    for (const call of calls) call.resolve(ALLOWED);
    await tick();
  }
}

test('identical lookups in flight share one query; distinct ones do not', async () => {
  const { calls, lookup } = controlled();
  const queue = new LookupQueue(lookup, { concurrency: 5, maxQueued: 100, maxWaitMs: 10_000 });
  const signal = new AbortController().signal;
  const answers = [queue.authorize(request('a:443'), signal), queue.authorize(request('a:443'), signal), queue.authorize(request('b:443'), signal)];
  await tick();
  assert.deepEqual(calls.map((c) => c.request.destination), ['a:443', 'b:443']);
  for (const call of calls) call.resolve(ALLOWED);
  assert.deepEqual(await Promise.all(answers), [ALLOWED, ALLOWED, ALLOWED]);
  assert.equal(queue.started, 2);
  // Nothing is remembered after it settles: the next ask is a new query.
  void queue.authorize(request('a:443'), signal);
  await tick();
  assert.equal(calls.length, 3);
});

test('a lookup whose every caller aborted before it started never reaches the registry', async () => {
  const { calls, lookup } = controlled();
  const queue = new LookupQueue(lookup, { concurrency: 5, maxQueued: 100, maxWaitMs: 10_000 });
  const first = new AbortController();
  const second = new AbortController();
  const answers = [queue.authorize(request('a:443'), first.signal), queue.authorize(request('a:443'), second.signal)];
  first.abort();
  second.abort();
  await assert.rejects(answers[0]!, LookupCancelledError);
  await assert.rejects(answers[1]!, LookupCancelledError);
  await tick();
  assert.equal(calls.length, 0);
  assert.equal(queue.started, 0);
});

test('one caller aborting leaves the shared lookup to the others', async () => {
  const { calls, lookup } = controlled();
  const queue = new LookupQueue(lookup, { concurrency: 5, maxQueued: 100, maxWaitMs: 10_000 });
  const gone = new AbortController();
  const stays = queue.authorize(request('a:443'), new AbortController().signal);
  const leaves = queue.authorize(request('a:443'), gone.signal);
  gone.abort();
  await assert.rejects(leaves, LookupCancelledError);
  await tick();
  calls[0]!.resolve(ALLOWED);
  assert.equal(await stays, ALLOWED);
});

test('an already-aborted signal is refused without queueing', async () => {
  const { lookup } = controlled();
  const queue = new LookupQueue(lookup, { concurrency: 1, maxQueued: 1, maxWaitMs: 10_000 });
  const controller = new AbortController();
  controller.abort();
  await assert.rejects(queue.authorize(request('a:443'), controller.signal), LookupCancelledError);
  assert.equal(queue.queued, 0);
});

test('concurrency bounds running lookups; a full queue is refused at once with RegistryUnavailableError', async () => {
  const { calls, lookup } = controlled();
  const queue = new LookupQueue(lookup, { concurrency: 1, maxQueued: 2, maxWaitMs: 10_000 });
  const signal = new AbortController().signal;
  const a = queue.authorize(request('a:443'), signal);
  await tick();
  assert.equal(queue.running, 1);
  const b = queue.authorize(request('b:443'), signal);
  const c = queue.authorize(request('c:443'), signal);
  assert.equal(queue.queued, 2);
  await assert.rejects(queue.authorize(request('d:443'), signal), (error: unknown) => error instanceof RegistryUnavailableError && /queue is full/.test((error as Error).message));
  // Joining a lookup already queued costs no room.
  const c2 = queue.authorize(request('c:443'), signal);
  calls[0]!.resolve(ALLOWED);
  await a;
  await tick();
  calls[1]!.resolve(ALLOWED);
  await b;
  await tick();
  calls[2]!.resolve(ALLOWED);
  assert.deepEqual(await Promise.all([c, c2]), [ALLOWED, ALLOWED]);
  assert.equal(queue.started, 3);
});

test('a lookup that waits longer than maxWaitMs to start gets RegistryUnavailableError on a timer, not a query', async () => {
  const { calls, lookup } = controlled();
  const queue = new LookupQueue(lookup, { concurrency: 1, maxQueued: 10, maxWaitMs: 20 });
  const signal = new AbortController().signal;
  const a = queue.authorize(request('a:443'), signal);
  await tick();
  const b = assert.rejects(queue.authorize(request('b:443'), signal), (error: unknown) => error instanceof RegistryUnavailableError && /waited more than 20 ms/.test((error as Error).message));
  // Rejected on the queue's own timer while the first lookup still runs (a hung registry).
  await b;
  assert.equal(queue.queued, 0);
  calls[0]!.resolve(ALLOWED);
  await a;
  await tick();
  assert.equal(calls.length, 1);
});

test('a failing lookup rejects every caller sharing it, and the next ask runs again', async () => {
  const { calls, lookup } = controlled();
  const queue = new LookupQueue(lookup, { concurrency: 2, maxQueued: 10, maxWaitMs: 10_000 });
  const signal = new AbortController().signal;
  const answers = [queue.authorize(request('a:443'), signal), queue.authorize(request('a:443'), signal)];
  await tick();
  const failure = new RegistryUnavailableError('down');
  calls[0]!.reject(failure);
  for (const answer of answers) await assert.rejects(answer, (error: unknown) => error === failure);
  const again = queue.authorize(request('a:443'), signal);
  await tick();
  calls[1]!.resolve(ALLOWED);
  assert.equal(await again, ALLOWED);
});

test('strangers (peers nobody has vouched for) get half the queue; a vouched-for lookup still queues and starts first', async () => {
  const { calls, lookup } = controlled();
  const queue = new LookupQueue(lookup, { concurrency: 4, maxQueued: 10, maxWaitMs: 10_000 });
  const signal = new AbortController().signal;
  const strangerSession = { vouched: false, strangerLookupsWaiting: 0 };
  const agentSession = { vouched: true, strangerLookupsWaiting: 0 };
  const stranger = (i: number) => queue.authorize(request(`s${i}.example:443`, 'stranger'), signal, 0, strangerSession);
  // Three of the four connections may run strangers' lookups, and five more may wait.
  const strangers = [stranger(0), stranger(1), stranger(2)];
  await tick();
  strangers.push(stranger(3), stranger(4), stranger(5), stranger(6), stranger(7));
  await tick();
  assert.deepEqual(calls.map((c) => c.request.destination), ['s0.example:443', 's1.example:443', 's2.example:443']);
  assert.equal(queue.queuedForStrangers, 5);
  // Regression: the whole queue was theirs, and a granted agent's uncached CONNECT got 503.
  await assert.rejects(stranger(8), /full for peers not yet vouched for \(5 waiting\)/);
  const agent = [queue.authorize(request('docs:443'), signal, 0, agentSession), queue.authorize(request('mail:443'), signal, 0, agentSession)];
  await tick();
  assert.equal(calls.length, 4, 'the fourth connection was left for a vouched-for lookup');
  assert.equal(calls[3]!.request.destination, 'docs:443');
  // A freed connection goes to the vouched-for lookup waiting, ahead of five older strangers'.
  calls[0]!.resolve(ALLOWED);
  await tick();
  assert.equal(calls[4]!.request.destination, 'mail:443');
  calls[3]!.resolve(ALLOWED);
  calls[4]!.resolve(ALLOWED);
  assert.deepEqual(await Promise.all(agent), [ALLOWED, ALLOWED]);
  await tick();
  assert.deepEqual(calls.slice(5).map((c) => c.request.destination), ['s3.example:443'], 'then strangers again, at most three at a time (s1 and s2 still run)');
  // The rest drain as connections free up.
  for (let settled = 5; settled < calls.length || queue.queued > 0; settled++) {
    calls[settled]?.resolve(ALLOWED);
    await tick();
  }
  for (const call of calls) call.resolve(ALLOWED);
  assert.equal((await Promise.all(strangers)).length, 8);
  assert.equal(calls.length, 10);
  assert.equal(queue.queuedForStrangers, 0);
  assert.equal(strangerSession.strangerLookupsWaiting, 0);
});

test('a vouched-for peer asking what a stranger asked moves the shared lookup up', async () => {
  const { calls, lookup } = controlled();
  const queue = new LookupQueue(lookup, { concurrency: 1, maxQueued: 10, maxWaitMs: 10_000 });
  const signal = new AbortController().signal;
  const strangerSession = { vouched: false, strangerLookupsWaiting: 0 };
  const first = queue.authorize(request('busy:443', 'x'), signal, 0, strangerSession);
  const queued = [queue.authorize(request('a:443', 'x'), signal, 0, strangerSession), queue.authorize(request('b:443', 'x'), signal, 0, strangerSession)];
  await tick();
  assert.equal(calls.length, 1);
  assert.equal(queue.queuedForStrangers, 2);
  const shared = queue.authorize(request('b:443', 'x'), signal, 0, { vouched: true, strangerLookupsWaiting: 0 });
  assert.equal(queue.queuedForStrangers, 1, 'b is no longer only a stranger\'s');
  assert.equal(strangerSession.strangerLookupsWaiting, 1);
  calls[0]!.resolve(ALLOWED);
  await tick();
  assert.equal(calls[1]!.request.destination, 'b:443', 'b starts before the older a');
  calls[1]!.resolve(ALLOWED);
  assert.equal(await shared, ALLOWED);
  assert.equal(await queued[1], ALLOWED);
  await tick();
  assert.equal(calls[2]!.request.destination, 'a:443');
  calls[2]!.resolve(ALLOWED);
  assert.equal(await queued[0], ALLOWED);
  assert.equal(await first, ALLOWED);
  await tick();
  assert.equal(calls.length, 3, 'b ran once, not again from the strangers\' queue');
  assert.equal(queue.queued, 0);
});

test('one session nobody has vouched for has at most 64 lookups waiting; another session still finds room, and the counts return to 0', async () => {
  const { calls, lookup } = controlled();
  const queue = new LookupQueue(lookup, { concurrency: 1, maxQueued: 1000, maxWaitMs: 10_000 });
  const flooder = { vouched: false, strangerLookupsWaiting: 0 };
  const newcomer = { vouched: false, strangerLookupsWaiting: 0 };
  const gone = new AbortController();
  // The first is given the one connection at once; 64 more wait.
  const asked = Array.from({ length: MAX_STRANGER_LOOKUPS_PER_SESSION + 1 }, (_, i) => queue.authorize(request(`f${i}:443`, 'flooder'), gone.signal, 0, flooder).catch((e: unknown) => e));
  assert.equal(flooder.strangerLookupsWaiting, MAX_STRANGER_LOOKUPS_PER_SESSION);
  assert.equal(queue.running, 1);
  await assert.rejects(queue.authorize(request('one-more:443', 'flooder'), gone.signal, 0, flooder), /this session, not yet vouched for, has 64 registry lookups waiting/);
  const first = queue.authorize(request('docs:443', 'newcomer'), new AbortController().signal, 0, newcomer);
  assert.equal(newcomer.strangerLookupsWaiting, 1);
  await tick();
  assert.equal(calls.length, 1, 'one connection: the flooder\'s first lookup runs');
  assert.equal(flooder.strangerLookupsWaiting, MAX_STRANGER_LOOKUPS_PER_SESSION);
  // The flooder leaves: its waiting lookups are dropped and counted out; the running one finishes.
  gone.abort();
  assert.equal(flooder.strangerLookupsWaiting, 0);
  calls[0]!.resolve(ALLOWED);
  await tick();
  assert.equal(calls[1]!.request.destination, 'docs:443');
  assert.equal(newcomer.strangerLookupsWaiting, 0);
  calls[1]!.resolve(ALLOWED);
  assert.equal(await first, ALLOWED);
  assert.equal((await Promise.all(asked)).filter((e) => e instanceof LookupCancelledError).length, MAX_STRANGER_LOOKUPS_PER_SESSION + 1, 'every one of the flooder\'s CONNECTs was cancelled, the running one too');
  assert.equal(queue.queued, 0);
});

test('strangers\' sessions are served in turn: a newcomer waits behind one lookup of a flooding session, not all of them', async () => {
  const { calls, lookup } = controlled();
  const queue = new LookupQueue(lookup, { concurrency: 1, maxQueued: 100, maxWaitMs: 10_000 });
  const signal = new AbortController().signal;
  const flooder = { vouched: false, strangerLookupsWaiting: 0 };
  const newcomer = { vouched: false, strangerLookupsWaiting: 0 };
  const asked = Array.from({ length: 5 }, (_, i) => queue.authorize(request(`f${i}:443`, 'flooder'), signal, 0, flooder));
  await tick();
  asked.push(queue.authorize(request('docs:443', 'newcomer'), signal, 0, newcomer));
  for (let i = 0; i < 6; i++) {
    await tick();
    calls[i]!.resolve(ALLOWED);
  }
  await Promise.all(asked);
  assert.deepEqual(calls.map((c) => c.request.destination), ['f0:443', 'f1:443', 'docs:443', 'f2:443', 'f3:443', 'f4:443']);
});

for (const concurrency of [2, 3, 4, 5, 8]) {
  test(`a pool of ${concurrency}: strangers never take every connection (review regression: pools under 4 kept none free)`, async () => {
    const { calls, lookup } = controlled();
    const queue = new LookupQueue(lookup, { concurrency, maxQueued: 100, maxWaitMs: 10_000 });
    const signal = new AbortController().signal;
    const stranger = { vouched: false, strangerLookupsWaiting: 0 };
    const asked = Array.from({ length: 10 }, (_, i) => queue.authorize(request(`s${i}:443`, 'stranger'), signal, 0, stranger));
    await tick();
    assert.equal(calls.length, concurrency - Math.max(1, Math.floor(concurrency / 4)));
    const agent = queue.authorize(request('docs:443'), signal, 0, { vouched: true, strangerLookupsWaiting: 0 });
    await tick();
    assert.equal(calls.at(-1)!.request.destination, 'docs:443', 'started at once on the free connection');
    await drain(queue, calls);
    await Promise.all([...asked, agent]);
  });
}

test('a pool of one: strangers may use it (a newcomer could never be vouched for otherwise)', async () => {
  const { calls, lookup } = controlled();
  const queue = new LookupQueue(lookup, { concurrency: 1, maxQueued: 10, maxWaitMs: 10_000 });
  const answer = queue.authorize(request('docs:443', 'newcomer'), new AbortController().signal, 0, { vouched: false, strangerLookupsWaiting: 0 });
  await tick();
  assert.equal(calls.length, 1);
  calls[0]!.resolve(ALLOWED);
  assert.equal(await answer, ALLOWED);
});

test('an abandoned or moved-up lookup leaves its queue at once, and a session with none left leaves the turns (review regression: kept while strangers\' connections were busy)', async () => {
  const { calls, lookup } = controlled();
  const queue = new LookupQueue(lookup, { concurrency: 2, maxQueued: 100, maxWaitMs: 10_000 });
  const session = { vouched: false, strangerLookupsWaiting: 0 };
  void queue.authorize(request('busy:443', 's'), new AbortController().signal, 0, session); // strangers' one connection
  await tick();
  const gone = new AbortController();
  const asked = Array.from({ length: 10 }, (_, i) => queue.authorize(request(`x${i}:443`, 's'), gone.signal, 0, session).catch(() => undefined));
  const shared = queue.authorize(request('moved:443', 's'), new AbortController().signal, 0, session);
  assert.equal(queue.strangerSessionsQueued, 1);
  void queue.authorize(request('moved:443', 's'), new AbortController().signal, 0, { vouched: true, strangerLookupsWaiting: 0 });
  gone.abort();
  await Promise.all(asked);
  assert.equal(queue.strangerSessionsQueued, 0, 'nothing of the session is kept');
  assert.equal(session.strangerLookupsWaiting, 0);
  await tick();
  assert.deepEqual(calls.map((c) => c.request.destination), ['busy:443', 'moved:443']);
  for (const call of calls) call.resolve(ALLOWED);
  assert.equal(await shared, ALLOWED);
});

test('lookups given a connection do not count as waiting: a pool of 2 and a queue of 2 take 4 distinct lookups read in one burst and refuse the 5th (review regression: 2 were let in, none waiting)', async () => {
  const { calls, lookup } = controlled();
  const queue = new LookupQueue(lookup, { concurrency: 2, maxQueued: 2, maxWaitMs: 10_000 });
  const signal = new AbortController().signal;
  const agent = { vouched: true, strangerLookupsWaiting: 0 };
  const asked = ['a', 'b', 'c', 'd'].map((d) => queue.authorize(request(`${d}:443`), signal, 0, agent));
  assert.equal(queue.running, 2);
  assert.equal(queue.queued, 2);
  await assert.rejects(queue.authorize(request('e:443'), signal, 0, agent), /registry lookup queue is full \(2 waiting\)/);
  await tick();
  assert.deepEqual(calls.map((c) => c.request.destination), ['a:443', 'b:443']);
  assert.equal(queue.queued, 2);
  // Still full while two wait; a freed connection makes room for one more.
  await assert.rejects(queue.authorize(request('e:443'), signal, 0, agent), /queue is full/);
  calls[0]!.resolve(ALLOWED);
  await tick();
  assert.equal(queue.queued, 1);
  const e = queue.authorize(request('e:443'), signal, 0, agent);
  await drain(queue, calls);
  assert.equal((await Promise.all([...asked, e])).length, 5);
  assert.equal(queue.started, 5);
});

test('a pool of one and a queue of N: N lookups wait behind the running one, asked in one burst or not', async () => {
  for (const sameBurst of [true, false]) {
    const { calls, lookup } = controlled();
    const queue = new LookupQueue(lookup, { concurrency: 1, maxQueued: 3, maxWaitMs: 10_000 });
    const signal = new AbortController().signal;
    const asked = [queue.authorize(request('a:443'), signal)];
    if (!sameBurst) await tick();
    asked.push(...['b', 'c', 'd'].map((d) => queue.authorize(request(`${d}:443`), signal)));
    assert.equal(queue.queued, 3);
    await assert.rejects(queue.authorize(request('e:443'), signal), /queue is full \(3 waiting\)/);
    await drain(queue, calls);
    assert.equal((await Promise.all(asked)).length, 4);
  }
});

test('strangers\' half of the queue counts only their lookups waiting: three quarters of a pool of 4 run and 5 wait, read in one burst', async () => {
  const { calls, lookup } = controlled();
  const queue = new LookupQueue(lookup, { concurrency: 4, maxQueued: 10, maxWaitMs: 10_000 });
  const signal = new AbortController().signal;
  const session = { vouched: false, strangerLookupsWaiting: 0 };
  const asked = Array.from({ length: 8 }, (_, i) => queue.authorize(request(`s${i}:443`, 'stranger'), signal, 0, session));
  assert.equal(queue.running, 3);
  assert.equal(queue.queuedForStrangers, 5);
  assert.equal(session.strangerLookupsWaiting, 5);
  await assert.rejects(queue.authorize(request('s8:443', 'stranger'), signal, 0, session), /full for peers not yet vouched for \(5 waiting\)/);
  // The fourth connection is still a vouched-for lookup's, at once.
  const agent = queue.authorize(request('docs:443'), signal, 0, { vouched: true, strangerLookupsWaiting: 0 });
  assert.equal(queue.running, 4);
  await tick();
  assert.equal(calls.length, 4);
  await drain(queue, calls);
  assert.equal((await Promise.all([...asked, agent])).length, 9);
  assert.equal(session.strangerLookupsWaiting, 0);
});

test('a lookup given a connection whose CONNECT is reset in the same burst is never sent, and its connection goes to the next waiting', async () => {
  const { calls, lookup } = controlled();
  const queue = new LookupQueue(lookup, { concurrency: 1, maxQueued: 1, maxWaitMs: 10_000 });
  const reset = new AbortController();
  const gone = queue.authorize(request('a:443'), reset.signal);
  const next = queue.authorize(request('b:443'), new AbortController().signal);
  assert.deepEqual([queue.running, queue.queued], [1, 1]);
  reset.abort();
  await assert.rejects(gone, LookupCancelledError);
  assert.deepEqual([queue.running, queue.queued], [1, 0]);
  await tick();
  assert.deepEqual(calls.map((c) => c.request.destination), ['b:443']);
  calls[0]!.resolve(ALLOWED);
  assert.equal(await next, ALLOWED);
  await tick();
  assert.deepEqual([queue.running, queue.queued, queue.started], [0, 0, 1]);
});

test('randomised: the counts never drift and the bounds hold exactly under asking, joining, moving up, aborting, settling and expiry', async () => {
  let seed = 20260501;
  const random = () => {
    seed = (seed * 1103515245 + 12345) % 2 ** 31;
    return seed / 2 ** 31;
  };
  const pick = <T>(items: readonly T[]): T => items[Math.floor(random() * items.length)]!;
  for (let round = 0; round < 40; round++) {
    const { calls, lookup } = controlled();
    const concurrency = 1 + Math.floor(random() * 4);
    const maxQueued = 1 + Math.floor(random() * 8);
    const maxWaitMs = random() < 0.3 ? 5 : 10_000;
    const queue = new LookupQueue(lookup, { concurrency, maxQueued, maxWaitMs });
    const maxStrangers = Math.max(1, Math.floor(maxQueued / 2));
    const strangers = [0, 1, 2].map(() => ({ vouched: false, strangerLookupsWaiting: 0 }));
    const askers = [...strangers, { vouched: true, strangerLookupsWaiting: 0 }, undefined];
    const controllers = Array.from({ length: 6 }, () => new AbortController());
    const answers: Promise<unknown>[] = [];
    let settled = 0;
    const check = (where: string) => {
      assert.ok(queue.queued <= maxQueued, `${where}: queued ${queue.queued} > ${maxQueued}`);
      assert.ok(queue.queuedForStrangers <= maxStrangers, `${where}: strangers' ${queue.queuedForStrangers} > ${maxStrangers}`);
      assert.ok(queue.queuedForStrangers <= queue.queued, where);
      assert.equal(strangers.reduce((sum, s) => sum + s.strangerLookupsWaiting, 0), queue.queuedForStrangers, `${where}: sessions' counts`);
      assert.ok(queue.running <= concurrency, where);
    };
    for (let step = 0; step < 200; step++) {
      const op = random();
      if (op < 0.5) {
        const asker = pick(askers);
        const before = { queued: queue.queued, strangers: queue.queuedForStrangers, running: queue.running };
        const answer = queue.authorize(request(`d${Math.floor(random() * 12)}:443`), pick(controllers).signal, 0, asker);
        answers.push(answer.then(() => undefined, (error: unknown) => {
          if (error instanceof RegistryUnavailableError && /full/.test(error.message)) {
            // Refused only when what waits is at its bound.
            if (/queue is full \(/.test(error.message)) assert.equal(before.queued, maxQueued);
            else assert.equal(before.strangers, maxStrangers);
            // ... and only lookups that found no connection wait (strangers' may find theirs all taken;
            // a vouched-for lookup is never refused while any connection is free).
            if (asker?.vouched !== false) assert.equal(before.running, concurrency, 'a vouched-for lookup refused beside a free connection');
            else assert.ok(before.running === concurrency || before.queued === before.strangers, 'refused beside a free connection');
          }
        }).finally(() => void settled++));
      } else if (op < 0.6) {
        const index = Math.floor(random() * controllers.length);
        controllers[index]!.abort();
        controllers[index] = new AbortController();
      } else if (op < 0.8) {
        const call = calls.splice(Math.floor(random() * calls.length), 1)[0];
        if (random() < 0.8) call?.resolve(ALLOWED);
        else call?.reject(new RegistryUnavailableError('down'));
      } else if (op < 0.95) {
        await tick();
        check(`round ${round} step ${step} after a tick`);
        // After the read: every connection held is a query sent, and none idles while a lookup that may use it waits.
        assert.equal(queue.running, calls.length);
        if (queue.queued > queue.queuedForStrangers) assert.equal(queue.running, concurrency, 'a vouched-for lookup waits beside a free connection');
      } else {
        await new Promise((resolve) => setTimeout(resolve, 6));
      }
      check(`round ${round} step ${step}`);
    }
    for (const controller of controllers) controller.abort();
    while (calls.length > 0) {
      calls.shift()!.resolve(ALLOWED);
      await tick();
    }
    await tick();
    await Promise.all(answers);
    assert.equal(settled, answers.length);
    assert.deepEqual([queue.queued, queue.queuedForStrangers, queue.running, queue.strangerSessionsQueued], [0, 0, 0, 0]);
    for (const session of strangers) assert.equal(session.strangerLookupsWaiting, 0);
  }
});

// Regression (review of the lookup_queue_size fix): with a queue of 1, one stranger's lookup
// waiting filled it, and a vouched-for CONNECT got 503 beside the connection kept for vouched-for
// lookups.
test('lookup queue: a lookup that gets a connection at once is never refused by a full queue', async () => {
  const pending: Array<() => void> = [];
  const queue = new LookupQueue(() => new Promise<AuthorizationResult>((resolve) => pending.push(() => resolve(ALLOWED))), { concurrency: 4, maxQueued: 1, maxWaitMs: 10_000 });
  const signal = new AbortController().signal;
  const stranger = { vouched: false, strangerLookupsWaiting: 0 };
  const strangers = [0, 1, 2, 3].map((i) => queue.authorize(request(`s${i}:443`), signal, 0, stranger));
  assert.equal(queue.running, 3, "strangers' share of 4 connections");
  assert.equal(queue.queued, 1, 'the queue of 1 is full');
  const agent = queue.authorize(request('docs:443'), signal, 0, { vouched: true, strangerLookupsWaiting: 0 });
  assert.equal(queue.running, 4, 'the vouched-for lookup took the free connection');
  const fifth = queue.authorize(request('s4:443'), signal, 0, stranger);
  await assert.rejects(fifth, /queue is full/, 'a stranger that would wait is still refused');
  // Answer every query, including those sent once others free their connection (after a read).
  for (let turn = 0; turn < 20; turn++) {
    while (pending.length > 0) pending.shift()!();
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
  assert.deepEqual(await agent, ALLOWED);
  await Promise.all(strangers);
});

test('authorizeMany: a batch is one query on one connection, answers in the order asked, never refused by a full queue, and bounded in wait', async () => {
  const { calls, lookup } = controlled();
  const batches: { requests: readonly AuthorizationRequest[]; resolve: (r: AuthorizationResult[]) => void }[] = [];
  const lookupMany = (requests: readonly AuthorizationRequest[]) => new Promise<AuthorizationResult[]>((resolve) => batches.push({ requests, resolve }));
  const queue = new LookupQueue(lookup, { concurrency: 2, maxQueued: 1, maxWaitMs: 200 }, lookupMany);
  const signal = new AbortController().signal;
  const denied = (destination: string) => ({ allowed: false, reason: 'no_permission', verdicts: [], destination }) as unknown as AuthorizationResult;
  const first = queue.authorizeMany([request('a:443'), request('b:443'), request('c:443')]);
  const second = queue.authorizeMany([request('d:443'), request('e:443')]);
  // Both connections held by the batches, the queue's one place taken by a CONNECT: a third batch still queues.
  const connect = queue.authorize(request('f:443'), signal);
  const third = queue.authorizeMany([request('g:443'), request('h:443')]);
  await tick();
  assert.equal(queue.running, 2);
  assert.equal(queue.queued, 2);
  assert.deepEqual(batches.map((b) => b.requests.map((r) => r.destination)), [['a:443', 'b:443', 'c:443'], ['d:443', 'e:443']]);
  assert.equal(calls.length, 0, 'no per-key query');
  batches[0]!.resolve(batches[0]!.requests.map((r) => denied(r.destination)));
  assert.deepEqual((await first).map((r) => (r as unknown as { destination: string }).destination), ['a:443', 'b:443', 'c:443']);
  await tick();
  // The freed connection goes to the oldest waiting job, the CONNECT's.
  assert.deepEqual(calls.map((c) => c.request.destination), ['f:443']);
  calls[0]!.resolve(ALLOWED);
  assert.equal(await connect, ALLOWED);
  await tick();
  assert.equal(batches.length, 3);
  batches[1]!.resolve([ALLOWED, ALLOWED]);
  batches[2]!.resolve([ALLOWED, ALLOWED]);
  assert.deepEqual(await second, [ALLOWED, ALLOWED]);
  assert.deepEqual(await third, [ALLOWED, ALLOWED]);
  assert.equal(queue.started, 4);
  await tick();
  assert.equal(queue.running, 0);
  assert.equal(queue.queued, 0);

  // A batch that finds no connection within maxWaitMs fails as a whole: its keys are retried by the caller.
  const stuck = queue.authorizeMany([request('i:443'), request('j:443')]);
  const stuck2 = queue.authorizeMany([request('k:443'), request('l:443')]);
  const late = queue.authorizeMany([request('m:443'), request('n:443')]);
  await assert.rejects(late, RegistryUnavailableError);
  assert.equal(batches.length, 5, 'the late batch was never sent');
  assert.equal(queue.queued, 0);
  batches[3]!.resolve([ALLOWED, ALLOWED]);
  batches[4]!.resolve([ALLOWED, ALLOWED]);
  await Promise.all([stuck, stuck2]);
});

test('authorizeMany without a batch function runs the lookups one after another on its one connection', async () => {
  const { calls, lookup } = controlled();
  const queue = new LookupQueue(lookup, { concurrency: 1, maxQueued: 10, maxWaitMs: 10_000 });
  const answers = queue.authorizeMany([request('a:443'), request('b:443')]);
  await tick();
  assert.deepEqual(calls.map((c) => c.request.destination), ['a:443']);
  assert.equal(queue.running, 1);
  calls[0]!.resolve(ALLOWED);
  await tick();
  assert.deepEqual(calls.map((c) => c.request.destination), ['a:443', 'b:443']);
  calls[1]!.resolve(ALLOWED);
  assert.deepEqual(await answers, [ALLOWED, ALLOWED]);
});
