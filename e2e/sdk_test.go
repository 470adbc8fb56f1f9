package e2e

import (
	"github.com/aws/aws-sdk-go-v2/aws/middleware"
	"github.com/aws/aws-sdk-go-v2/service/lambda"
)

// middlewareRequestID returns the X-Amzn-RequestId the SDK read from a response.
func middlewareRequestID(out *lambda.InvokeOutput) (string, bool) {
	return middleware.GetRequestIDMetadata(out.ResultMetadata)
}
