package agent

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/protocol"
)

func restoreDone(t *testing.T, ta *testAgent, req protocol.Restore) protocol.RestoreDone {
	t.Helper()
	ta.send(protocol.TypeRestore, req)
	f := ta.read()
	if f.Type != protocol.TypeRestoreDone {
		t.Fatalf("got %s, want RestoreDone", f.Type)
	}
	var done protocol.RestoreDone
	if err := f.Decode(&done); err != nil {
		t.Fatal(err)
	}
	return done
}

// A restored environment reports Lambda's Restore Duration, not the INIT
// its snapshot was taken after, and only an agent that owns its kernel
// renews it.
func TestRestore(t *testing.T) {
	var renewed []protocol.Restore
	old := renewEnv
	renewEnv = func(r protocol.Restore) error { renewed = append(renewed, r); return nil }
	t.Cleanup(func() { renewEnv = old })

	for _, own := range []bool{false, true} {
		renewed = nil
		ta := startAgentWith(t, Options{OwnsKernel: own})
		if done, _ := ta.init(fakeInit(t, "ok")); done.Error != nil {
			t.Fatalf("init: %+v", done.Error)
		}
		req := protocol.Restore{Seed: []byte("0123456789abcdef"), Hostname: "sandbox-new", RestoreDuration: 30 * time.Millisecond}
		if done := restoreDone(t, ta, req); done.Error != nil {
			t.Fatalf("restore: %+v", done.Error)
		}
		if own != (len(renewed) == 1) || (own && renewed[0].Hostname != "sandbox-new") {
			t.Fatalf("OwnsKernel=%v: renewed %+v", own, renewed)
		}
		r := ta.invoke(map[string]any{"echo": 1})
		mustSucceed(t, r)
		if r.RestoreDuration < 30*time.Millisecond || r.InitDuration != 0 {
			t.Fatalf("first invoke after restore: restore %v init %v", r.RestoreDuration, r.InitDuration)
		}
		if !strings.Contains(r.log, "\tRestore Duration: ") || strings.Contains(r.log, "Init Duration") {
			t.Fatalf("REPORT after restore:\n%s", r.log)
		}
		// Only the first invocation reports it.
		if r := ta.invoke(map[string]any{"echo": 2}); r.RestoreDuration != 0 || strings.Contains(r.log, "Restore Duration") {
			t.Fatalf("second invoke after restore: %v\n%s", r.RestoreDuration, r.log)
		}
	}
}

func TestRestoreBeforeInit(t *testing.T) {
	ta := startAgent(t)
	if done := restoreDone(t, ta, protocol.Restore{}); done.Error == nil || done.Error.ErrorType != errTypeInvalidState {
		t.Fatalf("restore before init: %+v", done.Error)
	}
}

var errTest = errors.New("no entropy for you")

// A renewal that fails is reported: the environment must not serve.
func TestRestoreRenewFails(t *testing.T) {
	old := renewEnv
	renewEnv = func(protocol.Restore) error { return errTest }
	t.Cleanup(func() { renewEnv = old })
	ta := startAgentWith(t, Options{OwnsKernel: true})
	if done, _ := ta.init(fakeInit(t, "ok")); done.Error != nil {
		t.Fatalf("init: %+v", done.Error)
	}
	if done := restoreDone(t, ta, protocol.Restore{}); done.Error == nil || !strings.Contains(done.Error.ErrorMessage, errTest.Error()) {
		t.Fatalf("restore with a failing renewal: %+v", done.Error)
	}
}

// TestRestoreHooks: a runtime parked in /restore/next ends INIT there, is
// released by Restore, and the restore waits for its after-restore hooks
// (until it asks for the next invocation); a failing hook fails the
// restore.
func TestRestoreHooks(t *testing.T) {
	ta := startAgent(t)
	if done, _ := ta.init(fakeInit(t, "restore-hooks")); done.Error != nil {
		t.Fatalf("init: %+v", done.Error)
	}
	if done := restoreDone(t, ta, protocol.Restore{}); done.Error != nil {
		t.Fatalf("restore: %+v", done.Error)
	}
	r := ta.invoke(map[string]any{"do": "echo"})
	mustSucceed(t, r)
	if !strings.Contains(r.log, "after-restore hook ran") {
		t.Errorf("the hook's output is not in the first invocation's log:\n%s", r.log)
	}

	tb := startAgent(t)
	if done, _ := tb.init(fakeInit(t, "restore-hook-fails")); done.Error != nil {
		t.Fatalf("init: %+v", done.Error)
	}
	if done := restoreDone(t, tb, protocol.Restore{}); done.Error == nil || done.Error.ErrorType != "Custom.HookBroke" {
		t.Fatalf("restore with a failing hook: %+v", done.Error)
	}
}

// A runtime parked in /restore/next that gets an invocation without a
// Restore (its environment was never snapshotted) is released and serves.
func TestRestoreNextWithoutRestore(t *testing.T) {
	ta := startAgent(t)
	if done, _ := ta.init(fakeInit(t, "restore-hooks")); done.Error != nil {
		t.Fatalf("init: %+v", done.Error)
	}
	mustSucceed(t, ta.invoke(map[string]any{"do": "echo"}))
}
