package e2e

import (
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/lambda"
	"github.com/aws/aws-sdk-go-v2/service/lambda/types"
)

// TestSnapStartThroughSDK publishes a SnapStart version on every VM
// driver: it is Pending until its snapshot exists, then Active with
// OptimizationStatus On; its environments are restored (REPORT says
// Restore Duration, not Init Duration, and the runtime saw a snap-start
// INIT), restored environments draw different random numbers, and a
// snapshot of one revision is never used for the next.
func TestSnapStartThroughSDK(t *testing.T) {
	forVMDrivers(t, func(t *testing.T, driver string) {
		snapStartThroughSDK(t, startServer(t, "", "--driver", driver))
	})
}

func snapStartThroughSDK(t *testing.T, s *server) {
	createProbe(t, s, "snap", func(in *lambda.CreateFunctionInput) {
		in.SnapStart = &types.SnapStart{ApplyOn: types.SnapStartApplyOnPublishedVersions}
		in.Timeout = aws.Int32(10)
		in.Environment = &types.Environment{Variables: map[string]string{"MARK": "one"}}
	})
	v1 := publishActive(t, s, "snap")

	type reply struct {
		Data  string
		Facts struct {
			Env map[string]string `json:"env"`
		} `json:"facts"`
	}
	// Two environments at once, so both are restored from the snapshot.
	var wg sync.WaitGroup
	outs := make([]*lambda.InvokeOutput, 2)
	for k := range outs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			payload, _ := json.Marshal(map[string]any{"action": "random", "n": 16, "ms": 500})
			out, err := s.sdk().Invoke(ctxT(t), &lambda.InvokeInput{FunctionName: aws.String("snap"), Qualifier: aws.String(v1),
				Payload: payload, LogType: types.LogTypeTail})
			if err != nil {
				t.Error(err)
				return
			}
			outs[k] = out
		}()
	}
	wg.Wait()
	seen := map[string]bool{}
	for _, out := range outs {
		if out == nil {
			t.FailNow()
		}
		if out.FunctionError != nil {
			t.Fatalf("restored invoke: %s", out.Payload)
		}
		log := tailLog(t, out)
		if !strings.Contains(log, "Restore Duration: ") || strings.Contains(log, "Init Duration") {
			t.Errorf("first invoke of a restored environment, REPORT:\n%s", log)
		}
		var r reply
		if err := json.Unmarshal(out.Payload, &r); err != nil || len(r.Data) != 32 {
			t.Fatalf("random: %s (%v)", out.Payload, err)
		}
		if seen[r.Data] {
			t.Errorf("two restored environments drew the same random bytes %s", r.Data)
		}
		seen[r.Data] = true
	}
	// The runtime's INIT was the snapshot's.
	var echo reply
	out := invokeAt(t, s, "snap", v1, map[string]any{"action": "echo"})
	if err := json.Unmarshal(out.Payload, &echo); err != nil || echo.Facts.Env["AWS_LAMBDA_INITIALIZATION_TYPE"] != "snap-start" ||
		echo.Facts.Env["MARK"] != "one" {
		t.Fatalf("echo of a restored environment: %s (%v)", out.Payload, err)
	}

	// A new revision gets a snapshot of its own: version 2 sees its code's
	// configuration, never version 1's snapshot.
	if _, err := s.sdk().UpdateFunctionConfiguration(ctxT(t), &lambda.UpdateFunctionConfigurationInput{FunctionName: aws.String("snap"),
		Environment: &types.Environment{Variables: map[string]string{"MARK": "two"}}}); err != nil {
		t.Fatal(err)
	}
	eventually(t, time.Minute, func() error {
		c, err := s.sdk().GetFunctionConfiguration(ctxT(t), &lambda.GetFunctionConfigurationInput{FunctionName: aws.String("snap")})
		if err != nil {
			return err
		}
		if c.LastUpdateStatus != types.LastUpdateStatusSuccessful {
			return errNotYet
		}
		return nil
	})
	v2 := publishActive(t, s, "snap")
	out = invokeAt(t, s, "snap", v2, map[string]any{"action": "echo"})
	if err := json.Unmarshal(out.Payload, &echo); err != nil || echo.Facts.Env["MARK"] != "two" {
		t.Fatalf("version %s ran version %s's snapshot: %s (%v)", v2, v1, out.Payload, err)
	}
}

// publishActive publishes $LATEST of name and waits until the version is
// Active with its snapshot taken.
func publishActive(t *testing.T, s *server, name string) string {
	t.Helper()
	pub, err := s.sdk().PublishVersion(ctxT(t), &lambda.PublishVersionInput{FunctionName: aws.String(name)})
	if err != nil {
		t.Fatal(err)
	}
	v := aws.ToString(pub.Version)
	var cfg *lambda.GetFunctionConfigurationOutput
	eventually(t, 5*time.Minute, func() error {
		cfg, err = s.sdk().GetFunctionConfiguration(ctxT(t), &lambda.GetFunctionConfigurationInput{FunctionName: aws.String(name), Qualifier: aws.String(v)})
		if err != nil {
			return err
		}
		if cfg.State == types.StatePending {
			return errNotYet
		}
		return nil
	})
	if cfg.State != types.StateActive || cfg.SnapStart == nil || cfg.SnapStart.OptimizationStatus != types.SnapStartOptimizationStatusOn {
		t.Fatalf("version %s: State %s (%s), SnapStart %+v; want Active with OptimizationStatus On", v, cfg.State, aws.ToString(cfg.StateReason), cfg.SnapStart)
	}
	return v
}

// The python runtime's SnapStart hooks: after-restore hooks registered with
// snapshot_restore_py run in every restored environment, and Python's own
// random generator is re-seeded there (it would otherwise repeat itself in
// every environment restored from one snapshot).
const snapPython = `import os, random, time
from snapshot_restore_py import register_after_restore

STATE = {"restored": 0}


@register_after_restore
def after():
    STATE["restored"] += 1


def handler(event, context):
    time.sleep(event.get("sleep", 0))
    return {"r": random.random(), "restored": STATE["restored"],
            "initType": os.environ.get("AWS_LAMBDA_INITIALIZATION_TYPE")}
`

func TestSnapStartPythonHooksThroughSDK(t *testing.T) {
	forVMDrivers(t, func(t *testing.T, driver string) {
		s := startServer(t, "", "--driver", driver)
		_, err := s.sdk().CreateFunction(ctxT(t), &lambda.CreateFunctionInput{
			FunctionName: aws.String("snappy"), Runtime: types.Runtime("python3.11"), Handler: aws.String("app.handler"),
			Role:      aws.String("arn:aws:iam::000000000000:role/x"),
			Code:      &types.FunctionCode{ZipFile: makeZip(t, map[string][]byte{"app.py": []byte(snapPython)}, nil)},
			Timeout:   aws.Int32(30),
			SnapStart: &types.SnapStart{ApplyOn: types.SnapStartApplyOnPublishedVersions},
		})
		if err != nil {
			t.Fatal(err)
		}
		v := publishActive(t, s, "snappy")
		var wg sync.WaitGroup
		outs := make([]*lambda.InvokeOutput, 2)
		for k := range outs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				out, err := s.sdk().Invoke(ctxT(t), &lambda.InvokeInput{FunctionName: aws.String("snappy"), Qualifier: aws.String(v),
					Payload: []byte(`{"sleep": 0.5}`)})
				if err != nil {
					t.Error(err)
					return
				}
				outs[k] = out
			}()
		}
		wg.Wait()
		var rs []float64
		for _, out := range outs {
			if out == nil || out.FunctionError != nil {
				t.Fatalf("restored python invoke: %+v", out)
			}
			var got struct {
				R        float64
				Restored int
				InitType string
			}
			if err := json.Unmarshal(out.Payload, &got); err != nil || got.Restored != 1 || got.InitType != "snap-start" {
				t.Fatalf("restored python environment: %s (%v)", out.Payload, err)
			}
			rs = append(rs, got.R)
		}
		if rs[0] == rs[1] {
			t.Errorf("two restored python environments drew the same random.random() %v", rs[0])
		}
	})
}

func TestSnapStartRefusedForNode(t *testing.T) {
	s := startServer(t, "")
	_, err := s.sdk().CreateFunction(ctxT(t), &lambda.CreateFunctionInput{
		FunctionName: aws.String("nodesnap"), Runtime: types.Runtime("nodejs20.x"), Handler: aws.String("index.handler"),
		Role:      aws.String("arn:aws:iam::000000000000:role/x"),
		Code:      &types.FunctionCode{ZipFile: exampleZip(t, "hello-node")},
		SnapStart: &types.SnapStart{ApplyOn: types.SnapStartApplyOnPublishedVersions},
	})
	if err == nil || !strings.Contains(err.Error(), "InvalidParameterValueException") {
		t.Fatalf("SnapStart on nodejs20.x: %v", err)
	}
}
