// Command hello-go is the smallest InvokeX function for a provided runtime:
// a Go binary named bootstrap that speaks the Lambda Runtime API through
// aws-lambda-go, exactly as it would on AWS Lambda.
package main

import (
	"context"
	"log"

	"github.com/aws/aws-lambda-go/lambda"
	"github.com/aws/aws-lambda-go/lambdacontext"
)

// Event is the invocation payload, e.g. {"name":"x"}.
type Event struct {
	Name string `json:"name"`
}

// Response is the function's result, returned to the caller as JSON.
type Response struct {
	Message string `json:"message"`
}

func handle(ctx context.Context, ev Event) (Response, error) {
	name := ev.Name
	if name == "" {
		name = "world"
	}
	requestID := ""
	if lc, ok := lambdacontext.FromContext(ctx); ok {
		requestID = lc.AwsRequestID
	}
	// Anything written to stdout or stderr lands in the invocation's log.
	log.Printf("request %s: greeting %s", requestID, name)
	return Response{Message: "Hello, " + name + "!"}, nil
}

func main() {
	lambda.Start(handle)
}
