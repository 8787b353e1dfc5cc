# The guide's "Python Example", as CRM teams copy it (rabbitmq-integration-guide.md).
import pika
import json

class EmailQueueService:
    def __init__(self):
        self.connection = pika.BlockingConnection(
            pika.ConnectionParameters('localhost')
        )
        self.channel = self.connection.channel()

    def send_email(self, email_data):
        self.channel.queue_declare(queue='email.send', durable=True)
        
        self.channel.basic_publish(
            exchange='',
            routing_key='email.send',
            body=json.dumps(email_data),
            properties=pika.BasicProperties(
                delivery_mode=2,  # Make message persistent
            )
        )

    def consume_inbound_emails(self, callback):
        self.channel.queue_declare(queue='email.inbound', durable=True)
        
        def on_message(ch, method, properties, body):
            email_data = json.loads(body)
            callback(email_data)
            ch.basic_ack(delivery_tag=method.delivery_tag)
        
        self.channel.basic_consume(
            queue='email.inbound',
            on_message_callback=on_message
        )
        
        self.channel.start_consuming()
