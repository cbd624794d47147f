import assert from 'node:assert/strict';
import { test } from 'node:test';
import { scriptedReply } from '../../demo/messages-api.js';

/** The demo's scripted Messages API: one tool round, and nothing from the prompt reaches Bash unquoted. */

const bash = [{ name: 'Bash' }, { name: 'Read' }];
const commandOf = (reply: ReturnType<typeof scriptedReply>) => {
  const block = reply.content.find((b) => b.type === 'tool_use');
  return block?.type === 'tool_use' ? block.input.command : undefined;
};

test('a prompt gets a Bash tool_use running curl on its first plain https URL, else on docstore/documents', () => {
  const ask = (text: string) => scriptedReply({ tools: bash, messages: [{ role: 'user', content: [{ type: 'text', text }] }] });
  const reply = ask('Access https://docstore/documents using curl.');
  assert.equal(reply.stopReason, 'tool_use');
  assert.equal(commandOf(reply), 'curl -sS https://docstore/documents');
  assert.equal(commandOf(ask('Fetch https://messaging/messages.')), 'curl -sS https://messaging/messages');
  assert.equal(commandOf(ask('hello')), 'curl -sS https://docstore/documents');
  // shell metacharacters end the URL: they never reach the command line
  assert.equal(commandOf(ask('https://docstore/x;rm${IFS}-rf`id`$(id)|y')), 'curl -sS https://docstore/x');
  assert.equal(commandOf(ask("https://docstore/a'b")), 'curl -sS https://docstore/a');
});

test('the tool_result is answered with a final text quoting it; an error result says the command failed', () => {
  const after = (content: string, isError = false) =>
    scriptedReply({ tools: bash, messages: [{ role: 'user', content: [{ type: 'tool_result', tool_use_id: 'toolu_1', content, is_error: isError }] }] });
  const ok = after('{"documents":[{"id":"doc-1"}]}');
  assert.equal(ok.stopReason, 'end_turn');
  assert.deepEqual(ok.content, [{ type: 'text', text: 'The command returned:\n\n{"documents":[{"id":"doc-1"}]}' }]);
  assert.match((after('curl: (56) CONNECT tunnel failed, response 403', true).content[0] as { text: string }).text, /^The command failed:\n\ncurl: \(56\)/);
});

test('requests without a Bash tool (side calls) and malformed bodies get a short text, never a tool_use', () => {
  for (const request of [{}, { messages: 'x' }, { tools: [], messages: [{ role: 'user', content: 'hi' }] }, { tools: 'Bash', messages: [null] }]) {
    const reply = scriptedReply(request as Parameters<typeof scriptedReply>[0]);
    assert.equal(reply.stopReason, 'end_turn');
    assert.equal(reply.content.length, 1);
    assert.equal(reply.content[0]!.type, 'text');
  }
});
