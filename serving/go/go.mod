module llmjax/serving

go 1.19
